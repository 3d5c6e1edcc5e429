"""GSQ-GAN networks: the tokenizer (encoder, GSQ, decoder) and the discriminators."""

from .encoder_decoder import Decoder, Encoder
from .tokenizer import GSQTokenizer, TokenizerOutput, count_parameters

__all__ = ["GSQTokenizer", "TokenizerOutput", "Encoder", "Decoder", "count_parameters"]
