"""Training data: where records come from (``sources``), their formats (``formats``, ``preferences``), which
train and which evaluate (``splits``), and tokenising with learned-token labels (``tokenization``);
``supervised`` puts them together for stage=sft."""

from .formats import FORMATS, Example, parse_example
from .preferences import PREFERENCE_FORMATS, PreferenceData, load_preferences, preference_pair
from .sources import read_records, splits_of
from .splits import read_splits, split_examples
from .supervised import load_data, load_examples
from .tokenization import IGNORE, TokenizedData, render_with_labels, tokenize, tokenize_examples

__all__ = [
    "FORMATS",
    "IGNORE",
    "PREFERENCE_FORMATS",
    "Example",
    "PreferenceData",
    "TokenizedData",
    "load_data",
    "load_examples",
    "load_preferences",
    "parse_example",
    "preference_pair",
    "read_records",
    "read_splits",
    "render_with_labels",
    "split_examples",
    "splits_of",
    "tokenize",
    "tokenize_examples",
]
