"""GSQ-GAN: the image tokenizer of "Scaling Image Tokenizers with Grouped Spherical Quantization",
trained on top of gsq_kernels (its public API only). Command line: `gsq` (gsq/cli.py).

    from gsq.config import preset
    from gsq.models import GSQTokenizer
    from gsq.checkpoint import load_checkpoint
"""
