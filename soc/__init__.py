"""SOC: self-organizing Gaussian class embeddings (Pisoni, 2023)."""
from soc.head import SOCHead, max_log_density, softmax_entropy

__all__ = ['SOCHead', 'max_log_density', 'softmax_entropy']
