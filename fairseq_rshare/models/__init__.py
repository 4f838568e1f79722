"""The rshare architectures: fairseq's LSTM and transformer models with random-shared tables."""
from . import rshare_lstm, rshare_lstm_lm, rshare_transformer, rshare_transformer_lm  # noqa: F401
