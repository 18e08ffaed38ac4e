"""Real CLIP (BPE) and T5 (sentencepiece) tokenizers trained offline on a small built-in corpus.

Tiny models need tokenizers of the real classes, built without the network: a byte-level BPE with CLIP's
`</w>` word ends, and a sentencepiece unigram model with byte fallback for T5.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

_WORDS = (
    "a an the of on in at with and under over near by from photo painting drawing portrait close-up cat dog "
    "horse bird fox astronaut robot woman man child castle city street forest river ocean mountain mountains "
    "moon sun sky cloud clouds sunrise sunset night light red blue green yellow golden white black small big "
    "old ancient futuristic sitting riding running standing flying reading wearing hat coat sofa table window "
    "watercolor oil digital cinematic detailed sharp soft misty snowy rainy dramatic"
).split()
_EXTRA_LINES = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    "A photo of a cat, 4k. An astronaut riding a horse on the moon! (cinematic) - \"quoted\"; 50% off?",
)


def training_corpus() -> list[str]:
    """A few thousand deterministic sentences made from a small prompt vocabulary."""
    lines = [" ".join(words) for words in itertools.islice(itertools.permutations(_WORDS[:24], 3), 3000)]
    lines += [" ".join(_WORDS[i : i + 7]) for i in range(0, len(_WORDS), 3)]
    return lines + list(_EXTRA_LINES) * 20


def build_clip_tokenizer(vocab_size: int = 1000, model_max_length: int = 77):
    """A CLIPTokenizer whose vocabulary and merges are learned here (byte-level BPE, `</w>` word ends)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    # CLIP looks up every byte both inside a word and as a word end.
    for symbol in pre_tokenizers.ByteLevel.alphabet():
        for piece in (symbol, symbol + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split()) for merge in learned["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>")
    tokenizer.model_max_length = model_max_length
    return tokenizer


def build_t5_tokenizer(vocab_size: int = 400, model_max_length: int = 512):
    """A T5TokenizerFast over a sentencepiece unigram model trained here (pad 0, eos 1, unk 2)."""
    import sentencepiece
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(training_corpus()),
            model_prefix=str(Path(folder) / "spiece"),
            vocab_size=vocab_size,
            model_type="unigram",
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=True,
            num_threads=1,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            minloglevel=2,
        )
        tokenizer = T5TokenizerFast.from_pretrained(folder, model_max_length=model_max_length)
        tokenizer.model_max_length = model_max_length
        return tokenizer
