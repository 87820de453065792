"""Triton kernels for the fused CP-MTP loss, installed as ``cpd_mtp.kernels``."""
