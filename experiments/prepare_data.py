"""Tokenize local text into the shards that `data.source = "shards"` reads.

  python -m experiments.prepare_data --input='corpus/*.jsonl' --tokenizer=tok.model --out=data/corpus

`--input`: comma-separated globs, files or directories of .txt / .jsonl / .parquet (.gz for text).
`--tokenizer`: a SentencePiece .model, a tokenizer.json, or "byte". Writes train and held-out flat
token shards and `manifest.json` (see `mmfree_jax.data.prepare`); then set `data.source=shards`,
`data.path=OUT` and `model.vocab_size` >= the manifest's vocab_size.
"""

from absl import app, flags

from mmfree_jax.data import prepare

_INPUT = flags.DEFINE_string("input", None, "comma-separated globs, files or directories",
                             required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model | tokenizer.json | byte",
                                 required=True)
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "text field of .jsonl / .parquet inputs")
_HELDOUT = flags.DEFINE_float("heldout_fraction", 0.01, "fraction of documents held out")
_TXT_DOC = flags.DEFINE_enum("txt_doc", "file", list(prepare.TXT_DOC_MODES),
                             "what one document is in a .txt file")
_SHARD_TOKENS = flags.DEFINE_integer("shard_tokens", prepare.DEFAULT_SHARD_TOKENS,
                                     "tokens per shard file (approximate upper bound)")


def main(argv: list[str]) -> None:
  del argv
  m = prepare.prepare(_INPUT.value, _TOKENIZER.value, _OUT.value, text_field=_TEXT_FIELD.value,
                      heldout_fraction=_HELDOUT.value, txt_doc=_TXT_DOC.value,
                      shard_tokens=_SHARD_TOKENS.value)
  print(f"wrote {_OUT.value}: {m['num_docs']:,} documents, {m['num_tokens']:,} tokens "
        f"(train {m['splits']['train']['num_tokens']:,}, held-out "
        f"{m['splits']['heldout']['num_tokens']:,}), vocab_size {m['vocab_size']}, "
        f"{len(m['shards'])} shards")


if __name__ == "__main__":
  app.run(main)
