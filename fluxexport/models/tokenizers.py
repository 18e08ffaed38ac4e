"""Real CLIP (BPE), T5 (sentencepiece), Qwen and Mistral (byte-level BPE, chat templates) tokenizers trained
offline on a small built-in corpus.

Tiny models need tokenizers of the real classes, built without the network: a byte-level BPE with CLIP's
`</w>` word ends, a sentencepiece unigram model with byte fallback for T5, and for FLUX.2 GPT-2-style
byte-level BPEs with Qwen's (FLUX.2 [klein]) or Mistral's (FLUX.2 [dev]) special tokens and chat templates that
render as the published ones do.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections import Counter
from pathlib import Path

_PROMPT_VOCABULARY = """
a an the of on in at with and under over near by from photo painting drawing portrait close-up cat
dog horse bird fox astronaut robot woman man child castle city street forest river ocean mountain
mountains moon sun sky cloud clouds sunrise sunset night light red blue green yellow golden white
black small big old ancient futuristic sitting riding running standing flying reading wearing hat
coat sofa table window watercolor oil digital cinematic detailed sharp soft misty snowy rainy
dramatic
"""
_WORDS = _PROMPT_VOCABULARY.split()
_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")
_EXTRA_LINES = (
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789",
    'A photo of a cat, 4k. An astronaut riding a horse on the moon! (cinematic) - "quoted"; 50% off?',
)


def training_corpus() -> list[str]:
    """A few thousand deterministic sentences made from a small prompt vocabulary."""
    lines = [" ".join(words) for words in itertools.islice(itertools.permutations(_WORDS[:24], 3), 3000)]
    lines += [" ".join(_WORDS[i : i + 7]) for i in range(0, len(_WORDS), 3)]
    return lines + list(_EXTRA_LINES) * 20


def learn_bpe_merges(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE on `</w>`-terminated words; ties go to the lexicographically largest pair, so the
    result is the same on every machine (the `tokenizers` trainer breaks ties by hash order)."""
    words = Counter(word for line in corpus for word in _WORD_PATTERN.findall(line.lower()))
    return _learn_merges({tuple(word[:-1]) + (word[-1] + "</w>",): count for word, count in words.items()}, num_merges)


def learn_byte_level_merges(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE over GPT-2's byte-level pre-tokenization (a leading space is `Ġ`), deterministic as above."""
    from tokenizers import pre_tokenizers

    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(word for line in corpus for word, _ in splitter.pre_tokenize_str(line))
    return _learn_merges({tuple(word): count for word, count in words.items()}, num_merges)


def _learn_merges(segmented: dict[tuple[str, ...], int], num_merges: int) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in segmented.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        segmented = {_merge(symbols, best): count for symbols, count in segmented.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_clip_tokenizer(num_merges: int = 400, model_max_length: int = 77):
    """A CLIPTokenizer with CLIP's layout (bytes, bytes + `</w>`, merges, specials) learned here."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = learn_bpe_merges(training_corpus(), num_merges)
    pieces = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
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


# Qwen's special tokens; the chat template renders a conversation as Qwen3's own template does for FLUX.2's
# prompts (user turns, a generation prompt, and the empty thinking block of `enable_thinking=False`).
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_qwen_tokenizer(num_merges: int = 400, model_max_length: int = 512):
    """A Qwen2Tokenizer (byte-level BPE learned here, Qwen's special tokens, a chat template), pad <|endoftext|>."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    merges = learn_byte_level_merges(training_corpus(), num_merges)
    pieces = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in merges]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = model_max_length
    return tokenizer


# Mistral's first special tokens in their published order ([IMG] 10, <pad> 11, [SYSTEM_PROMPT] 17); the chat
# template renders FLUX.2 [dev]'s conversations (a system turn, user turns whose content is a list of text and image
# parts) as Mistral-Small-3.2's template does: <s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST].
MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)  # fmt: skip
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set parts = namespace(text='') %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{%- set parts.text = parts.text + part['text'] %}"
    "{%- elif part['type'] == 'image' %}{%- set parts.text = parts.text + '[IMG]' %}{%- endif %}"
    "{%- endfor %}{%- set text = parts.text %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def build_mistral_tokenizer(num_merges: int = 400, model_max_length: int = 512):
    """A fast byte-level BPE tokenizer (learned here) with Mistral's special tokens and ids and a chat template:
    the text half of FLUX.2 [dev]'s PixtralProcessor, which hands text-only conversations to its tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = learn_byte_level_merges(training_corpus(), num_merges)
    pieces = list(MISTRAL_SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(p) for p in merges]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens(list(MISTRAL_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.model_max_length = model_max_length
    return tokenizer
