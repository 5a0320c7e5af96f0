"""Install: ``pip install .`` (add ``[ffcv]``, ``[deepspeed]``, ``[tensorboard]``, ``[export]``,
``[dev]`` as needed).

Runtime requirements are loose on purpose (bring your own CUDA torch); the versions used for
development and CI are pinned in launch/constraints.txt. The optional native extension in csrc/
is built when torch and a C++ compiler are importable at build time (use
``pip install --no-build-isolation .``); otherwise it is skipped and the pure-PyTorch / Triton
kernels are used.
"""
import importlib.util
import os

from setuptools import find_packages, setup


def _native():
    """Extension modules from kernels/native_build.py, loaded by path (the package itself is not
    importable before it is installed). No torch or no compiler: a pure-Python install."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, "distributed_prune", "kernels", "native_build.py")
        spec = importlib.util.spec_from_file_location("_dprune_native_build", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods = mod.extension_modules()
        return (mods, mod.build_ext_cmdclass()) if mods else ([], {})
    except Exception as e:  # the extension is optional
        print(f"distributed_prune: building without native ops ({type(e).__name__}: {e})")
        return [], {}


ext_modules, cmdclass = _native()

setup(
    name="distributed_prune",
    version="0.1.0",
    description="Fair, fast, large-scale filter pruning (prune-and-retrain, trainability, DDP/DeepSpeed, FFCV, Triton)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distributed_prune", "distributed_prune.*"]),
    package_data={"distributed_prune": ["kernels/*.json"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "torch-pruning>=1.5",
        "numpy",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "ffcv": ["ffcv>=1.0.2"],  # needs pkg-config, libturbojpeg and libopencv (see launch/env.sh)
        "deepspeed": ["deepspeed>=0.14"],
        "tensorboard": ["tensorboard>=2.14"],                     # output.tensorboard: true
        "export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.17"],  # dprune export --format onnx
        "dev": ["pytest", "pytest-timeout", "ninja"],
    },
    entry_points={"console_scripts": ["dprune=distributed_prune.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
