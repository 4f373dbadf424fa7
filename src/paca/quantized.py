# Temporary: paca.train.methods still imports this path; removed once its import is updated.
from .tuner.quantized import import_bitsandbytes  # noqa: F401
