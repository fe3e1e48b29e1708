"""Two deliberately different tokenizers trained on the demo data, saved as HF fast-tokenizer folders.

- teacher: byte-level BPE in the GPT-2 style (``Ġ`` word prefix, bytes as characters, no BOS added, EOS
  ``<|endoftext|>``, its own pad token);
- student: SentencePiece unigram (``▁`` word prefix via Metaspace, ``<0xNN>`` byte fallback, BOS
  ``<s>`` added to every sequence, EOS ``</s>``, pad ``<pad>``, unk ``<unk>``).

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


def train_student_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 900) -> Path:
    """Train (with ``sentencepiece``) and save the unigram student tokenizer; returns the folder.

    The pieces and scores of the trained SentencePiece model are loaded into a ``tokenizers`` Unigram model
    with byte fallback (``<0xNN>`` pieces, e.g. ``<0x0A>`` for a newline, as in Llama), a Metaspace
    pre-tokenizer and a post-processor adding ``<s>``. (The ``tokenizers`` Unigram trainer is not
    reproducible run to run, sentencepiece with one thread is.)
    """
    _single_threaded()
    import io

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Lines as sentences: newlines never enter a piece, they encode through byte fallback.
    sentences = [line for text in texts for line in text.split("\n") if line.strip()]
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model_bytes, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, num_threads=1, normalization_rule_name="identity", character_coverage=1.0,
        hard_vocab_limit=False,  # the small demo corpus supports fewer pieces than asked; take what it has
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=STUDENT_SPECIALS["unk_token"],
        bos_piece=STUDENT_SPECIALS["bos_token"], eos_piece=STUDENT_SPECIALS["eos_token"],
        pad_piece=STUDENT_SPECIALS["pad_token"], minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    pieces = [(processor.id_to_piece(i), float(processor.get_score(i))) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                      prepend_scheme="first")])
    specials = [STUDENT_SPECIALS[key] for key in ("unk_token", "bos_token", "eos_token", "pad_token")]
    tokenizer.add_special_tokens(specials)
    bos = STUDENT_SPECIALS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **STUDENT_SPECIALS)
    wrapped.save_pretrained(str(out_dir))
    return Path(out_dir)
