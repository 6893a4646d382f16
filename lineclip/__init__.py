"""lineclip: a CLIP-style dual encoder for Tibetan line images and their transcriptions."""

__version__ = "0.1.0"
