"""EMICA Realtime: real-time 3D face reconstruction (EMICA / EMOCA / DECA on FLAME)."""

__version__ = "0.1.0"
