from setuptools import find_packages, setup

# What the recipes, results table and benchmarks import; sacrebleu >= 2 for its JSON output.
RECIPES = ["sentencepiece", "matplotlib", "sacrebleu>=2"]
# Converting an exported translation model for fast CPU inference.
EXPORT = ["ctranslate2"]

setup(
    name="fairseq-rshare",
    version="0.1.0",
    description="Random parameter sharing for fairseq embeddings and softmax layers (Li et al., AAAI 2018)",
    license="MIT",
    packages=find_packages(include=["fairseq_rshare", "fairseq_rshare.*"]),
    package_data={"fairseq_rshare.kernels": ["*.cpp"]},
    python_requires=">=3.8",
    install_requires=["ve-fairseq==0.12.3", "torch>=2.6", "numpy", "ninja", "omegaconf"],
    extras_require={
        "recipes": RECIPES,
        "export": EXPORT,
        "test": ["pytest>=7", "pytest-xdist", "hypothesis"] + RECIPES + EXPORT,
    },
    entry_points={
        "console_scripts": [
            "fairseq-rshare-demo=fairseq_rshare.cli.demo:main",
            "fairseq-rshare-export=fairseq_rshare.cli.export:main",
            "fairseq-rshare-compress=fairseq_rshare.cli.compress:main",
        ]
    },
)
