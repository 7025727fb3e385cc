"""HET and HET-XL heteroscedastic classification heads (see `hetxl.heads`)."""
from hetxl.heads import HETHead, HETXLHead

__all__ = ['HETHead', 'HETXLHead']
