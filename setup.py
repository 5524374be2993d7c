from setuptools import find_packages, setup

SWEEP = ["hydra-core>=1.3,<1.4", "hydra-joblib-launcher>=1.2", "hydra-submitit-launcher>=1.2"]
EVAL = ["matplotlib", *SWEEP]
TEST = ["pytest", "hypothesis", *EVAL]
#: threestudio_perpneg.guiders (Modular Diffusers guider) needs diffusers' guiders API.
GUIDER = ["diffusers>=0.35"]
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]

setup(
    name="threestudio-perpneg",
    version="0.1.0",
    description="Perp-Neg guidance (arXiv 2304.04968) as a threestudio plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["threestudio_perpneg", "threestudio_perpneg.*"])
    + ["threestudio_perpneg.configs"],
    # The YAMLs live in the repository's configs/ and ship inside the package for the link command.
    package_dir={"threestudio_perpneg.configs": "configs"},
    package_data={
        "threestudio_perpneg.configs": ["*.yaml"],
        "threestudio_perpneg.eval.sweep": [
            "conf/*.yaml",
            "conf/job/*.yaml",
            "conf/prompts/*.yaml",
            "conf/hydra/launcher/*.yaml",
        ],
        # The Janus testbed's shipped priors (diffusers folders) and view/identity classifier.
        "threestudio_perpneg.testbed": [
            "assets/prior/*.json",
            "assets/prior/*.png",
            "assets/prior/*/*.json",
            "assets/prior/*/*.txt",
            "assets/prior/*/*.safetensors",
            "assets/classifier/*.json",
            "assets/classifier/*.safetensors",
            "assets/classifier/*.png",
            # The sharper family's p35 (the demo's prior; about 6 MB).
            "assets/priors-6000/*/*.json",
            "assets/priors-6000/*/*.png",
            "assets/priors-6000/*/*/*.json",
            "assets/priors-6000/*/*/*.txt",
            "assets/priors-6000/*/*/*.safetensors",
        ],
    },
    install_requires=[
        "torch>=1.13",
        "diffusers>=0.19",
        "transformers>=4.28",
        "safetensors",
        "omegaconf>=2.3",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "eval": EVAL,
        "sweep": SWEEP,
        "open_clip": ["open_clip_torch"],
        "deepfloyd": ["sentencepiece", "protobuf"],
        "guider": GUIDER,
        "docs": DOCS,
        "test": TEST,
        "dev": [*TEST, "ruff", "mypy"],
    },
    entry_points={
        "console_scripts": [
            "threestudio-perpneg=threestudio_perpneg.__main__:main",
            "perpneg-2d=threestudio_perpneg.__main__:perpneg_2d",
        ]
    },
)
