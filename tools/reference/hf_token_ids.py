#!/usr/bin/env python3
"""Token ids of a text file by Hugging Face's `tokenizers` package, as little-endian u32.

usage: hf_token_ids.py TOKENIZER_JSON TEXT_FILE OUT_FILE
"""

import sys

import numpy as np
from tokenizers import Tokenizer

tokenizer_json, text_file, out_file = sys.argv[1:4]
with open(text_file, encoding="utf-8") as f:
    text = f.read()
ids = Tokenizer.from_file(tokenizer_json).encode(text, add_special_tokens=False).ids
np.asarray(ids, dtype="<u4").tofile(out_file)
