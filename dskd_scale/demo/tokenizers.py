"""Two deliberately different tokenizers trained on the demo data, saved as HF fast-tokenizer folders.

- teacher: byte-level BPE in the GPT-2 style (``Ġ`` word prefix, bytes as characters, no BOS added, EOS
  ``<|endoftext|>``, its own pad token);
- student: SentencePiece-style BPE like Llama-2's (``▁`` word prefix via Metaspace, ``<0xNN>`` byte
  fallback, BOS ``<s>`` added to every sequence, EOS ``</s>``, pad ``<pad>``, unk ``<unk>``).

So the demo exercises the cross-tokenizer path (different vocabularies, prefixes, byte handling and
special tokens) with no external files. Both load offline with ``AutoTokenizer.from_pretrained(dir)``.
Training runs single-threaded (``RAYON_NUM_THREADS=1``) so a seed and corpus give the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TEACHER_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
STUDENT_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _single_threaded() -> None:
    # Rayon reads this when its pool starts; set before the first tokenizers call in this process.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_teacher_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1200) -> Path:
    """Train and save the byte-level BPE teacher tokenizer; returns the folder."""
    _single_threaded()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TEACHER_SPECIALS["eos_token"], TEACHER_SPECIALS["pad_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **TEACHER_SPECIALS)
    wrapped.save_pretrained(str(out_dir))
    return Path(out_dir)


def train_student_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 700,
                            split_punctuation: bool = False) -> Path:
    """Train and save the SentencePiece-style (Llama-like) student tokenizer; returns the folder.

    ``split_punctuation=False`` (the test fixtures' hard case): the BPE is trained on single lines, so a word that
    starts a line inside a text (the first word of every response, after ``Response:\n``) has no piece of its own
    and falls apart into letters, and sentence punctuation merges into the word before it (``▁Taka.``). Neither
    tokenization exists on the teacher side, so exact token alignment pairs none of those tokens.
    ``split_punctuation=True`` (the demo): closer to Llama-2's SentencePiece, which splits letters from punctuation
    (``split_by_unicode_script``) and was trained on text where words follow newlines: ``.,:;?!`` become pieces of
    their own and the BPE is trained on whole texts split at newlines, so line-initial words get bare pieces.

    A BPE over ``▁``-prefixed words (Metaspace), with ``<0xNN>`` byte-fallback pieces appended to the
    vocabulary, so newlines encode as ``<0x0A>`` and unseen characters stay lossless, as in Llama-2; a
    post-processor adds ``<s>``. (A sentencepiece *unigram* model trained on this small, repetitive corpus keeps
    mostly single letters, and the ``tokenizers`` unigram trainer is not reproducible run to run.)
    """
    _single_threaded()
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [STUDENT_SPECIALS[key] for key in ("unk_token", "bos_token", "eos_token", "pad_token")]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_model = Tokenizer(models.BPE(unk_token=STUDENT_SPECIALS["unk_token"]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    if split_punctuation:
        # Newlines never enter a piece (removed while training, isolated when encoding: byte fallback, as in
        # Llama's vocabulary); the word after a newline keeps no ``▁``, as it does when a whole text is encoded.
        punctuation = pre_tokenizers.Split(Regex(r"[.,:;?!]"), behavior="isolated")
        trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", behavior="removed"), metaspace, punctuation])
        encoder = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"), metaspace, punctuation])
        trainer_model.train_from_iterator(list(texts), trainer=trainer)
    else:
        # Newlines never enter a piece: they are left to byte fallback, as in Llama's vocabulary.
        lines = [line for text in texts for line in text.split("\n") if line.strip()]
        trainer_model.pre_tokenizer = encoder = metaspace
        trainer_model.train_from_iterator(lines, trainer=trainer)

    trained = json.loads(trainer_model.to_str())["model"]
    vocab = dict(trained["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=STUDENT_SPECIALS["unk_token"], byte_fallback=True))
    tokenizer.pre_tokenizer = encoder
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                      prepend_scheme="first")])
    tokenizer.add_special_tokens(specials)
    bos = STUDENT_SPECIALS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **STUDENT_SPECIALS)
    wrapped.save_pretrained(str(out_dir))
    return Path(out_dir)
