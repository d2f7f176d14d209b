"""elt-scale: Elastic Looped Transformers for visual generation, trained with ILSD at cluster scale."""
__version__ = "0.1.0"


def __getattr__(name):
    # `from elt_scale import ELT` without making every `import elt_scale` pay for torch and huggingface_hub
    if name == "ELT":
        from .api import ELT
        return ELT
    raise AttributeError(f"module 'elt_scale' has no attribute {name!r}")
