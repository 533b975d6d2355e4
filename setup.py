"""Packaging for nfnets-jax.

The core (models, optimizers, the published weights) needs only JAX, Haiku,
optax and chex, plus filelock and tqdm for downloads, so that projects
importing AGC do not pull in TensorFlow. Input pipelines, training and
the command-line tools live behind extras; `all` installs every one of them
(`export`, the converters and runtimes of `nfnets_jax.export`, and `flax`, the
NNX modules of `nfnets_jax.nnx`, are separate).
"""
import setuptools

CORE = [
    "jax",
    "jaxlib",
    "dm-haiku",
    "optax",
    "chex",
    "numpy",
    # The published weights' downloader (nfnets_jax/weights.py): one download per
    # job under a file lock, with a progress bar.
    "filelock",
    "tqdm",
]
# TensorFlow only serves the input pipelines. The CPU build is enough there and
# is much smaller; it exists for x86-64 Linux and Windows only.
DATA = [
    'tensorflow-cpu; platform_machine == "x86_64" or platform_machine == "AMD64"',
    'tensorflow; platform_machine != "x86_64" and platform_machine != "AMD64"',
    "tensorflow-datasets",
    # NumPy's name for bfloat16 without TensorFlow (data/options.py).
    "ml-dtypes",
    # TFDS imports it to locate builders but declares it only for Python < 3.9.
    "importlib-resources",
    "scikit-learn",
    "pillow",
    # One process prepares a dataset that several share (data/sources.py).
    "filelock",
    "absl-py",
]
TRAIN = [
    "absl-py",
    "ml-collections",
    "orbax-checkpoint",
    "tensorboard",
    "tqdm",
]
TOOLS = [
    "absl-py",
    "dill",
    "safetensors",
    # timm's trained weights by name (nfnets_jax/weights/timm_hub.py): the hub's cache and download.
    "huggingface_hub",
    "matplotlib",
]
# `python -m nfnets_jax.export`: TensorFlow for SavedModel/TFLite (jax2tf, the TFLite
# converter), onnx for ONNX (nfnets_jax.onnx_graph); the runtimes that check the files.
EXPORT = [
    'tensorflow-cpu; platform_machine == "x86_64" or platform_machine == "AMD64"',
    'tensorflow; platform_machine != "x86_64" and platform_machine != "AMD64"',
    "onnx",
    "onnxruntime",
    "ai-edge-litert",
]
TEST = [
    "pytest",
    "pytest-xdist",
]
# `nfnets_jax.nnx`: the models as Flax NNX modules.
FLAX = [
    "flax",
]
# Heavy optional peers used by interop tests and benchmarks only. The torch pair
# is pinned because torchvision breaks beside other torch releases.
PEERS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm",
]

setuptools.setup(
    name="nfnets-jax",
    version="0.1.0",
    description="Normalizer-Free Networks (NFNets) and Adaptive Gradient Clipping for JAX/Haiku",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["nfnets_jax", "nfnets_jax.*"]),
    package_data={"nfnets_jax": ["resources/*"]},
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "train": DATA + TRAIN,
        "tools": TOOLS,
        "test": TEST,
        "peers": PEERS,
        "export": EXPORT,
        "flax": FLAX,
        "all": DATA + TRAIN + TOOLS,
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
