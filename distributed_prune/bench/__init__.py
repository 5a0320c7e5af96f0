"""Benchmarks, run by ``dprune bench {kernels,train,loader,speedup} ...`` (never collected by pytest).

    dprune bench speedup --model resnet50 --ratios "[0,0.6,0.6,0.6,0.21,0]"
    dprune bench train --model resnet50 --fast-path-ablation
"""
