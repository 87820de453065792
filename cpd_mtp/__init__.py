"""cpd_mtp: rank-r CP-decomposition multi-token prediction heads."""

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead, CPDMTPHeadOutput

__all__ = ["CPDMTPConfig", "CPDMTPHead", "CPDMTPHeadOutput"]
__version__ = "0.1.0"
