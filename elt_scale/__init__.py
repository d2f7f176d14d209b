"""elt-scale: Elastic Looped Transformers for visual generation, trained with ILSD at cluster scale."""
__version__ = "0.1.0"
