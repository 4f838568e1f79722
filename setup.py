from setuptools import setup

setup(
    name="fairseq-rshare",
    version="0.1.0",
    description="Random parameter sharing for fairseq embeddings and softmax layers (Li et al., AAAI 2018)",
    license="MIT",
    packages=["fairseq_rshare"],
    python_requires=">=3.8",
    install_requires=["ve-fairseq==0.12.3", "torch>=2.6", "numpy", "ninja"],
    extras_require={"test": ["pytest>=7", "hypothesis"]},
    entry_points={"console_scripts": ["fairseq-rshare-demo=fairseq_rshare.demo:main"]},
)
