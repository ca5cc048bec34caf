#!/usr/bin/env python3
"""Check that the Hugging Face tokenizers library reads a tokenizer.json from `moelab tokenizer
export` and encodes a text to the ids `moelab tokenizer encode` gives.

    moelab tokenizer export --tokenizer tok.txt --out tokenizer.json
    moelab tokenizer encode --tokenizer tok.txt < sample.txt > sample.ids
    python3 scripts/check_hf_tokenizer.py tokenizer.json sample.txt sample.ids
"""
import sys

from tokenizers import Tokenizer


def main():
    path, text_path, ids_path = sys.argv[1:4]
    tok = Tokenizer.from_file(path)
    # newline="": keep "\r\n" as it is (Python's default reading turns it into "\n").
    text = open(text_path, encoding="utf-8", newline="").read()
    want = [int(x) for x in open(ids_path).read().split()]
    got = tok.encode(text, add_special_tokens=False).ids
    same = got == want
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"tokenizers: {len(got)} ids, moelab: {len(want)} ids, "
          f"{'identical' if same else f'first difference at position {first}'}; "
          f"decode round trip {'OK' if tok.decode(got) == text else 'differs'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
