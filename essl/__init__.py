"""essl: equivariant self-supervised learning (Dangovski et al., "Equivariant Contrastive Learning", ICLR 2022)."""

__version__ = "0.2.0"


def load_encoder(path, map_location="cpu"):
    """Load a frozen encoder file (see :mod:`essl.encoder`)."""
    from essl.encoder import load_encoder as _load

    return _load(path, map_location=map_location)


__all__ = ["__version__", "load_encoder"]
