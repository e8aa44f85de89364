"""Small locally trained tokenizers (Qwen2 byte-level BPE, CLIP BPE, T5 Unigram) for tiny checkpoints.

Why: there is no hub access, so tokenizers for random-weight tiny checkpoints are built locally.

Each builder splits a built-in deterministic English corpus into words with the exact normalizer and
pre-tokenizer of the target ``transformers`` class, trains on them with the ``tokenizers`` library, and
constructs that class from the trained ``vocab`` (and ``merges``). In transformers 5 these classes rebuild
their pipeline from ``vocab``/``merges`` on ``from_pretrained`` too, so a saved folder reloads to the same
ids. Building is deterministic (byte-identical files on every run) and takes well under a second.
"""

from __future__ import annotations

import json
import random
import re
import string

import transformers
from tokenizers import Tokenizer, models, trainers

QWEN_IMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Qwen2.5-VL added tokens, in the order (so with the relative ids) of the real checkpoint.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
_BPE_MERGES = 1200  # learned merges of both BPE tokenizers
_UNIGRAM_VOCAB = 1500  # upper bound; the small corpus yields about 1240 pieces
_EOW_SHIFT = 0xE000  # private-use stand-ins for the "<byte></w>" symbols while training CLIP's BPE

# Word lists of the corpus ("_" joins the words of one entry).
_LISTS = {
    "color": "red green blue yellow white black orange purple pink brown gray cyan gold silver",
    "shape": "circle square triangle star cross rectangle hexagon oval diamond heart line arrow",
    "size": "small large big tiny huge medium",
    "position": "top_left top_right bottom_left bottom_right center top bottom left_side right_side",
    "subject": (
        "cat dog bird horse car house tree flower mountain river city street woman man child robot boat "
        "castle bridge lighthouse astronaut dragon apple cup book chair window clock"
    ),
    "place": "forest beach park desert kitchen room garden sky ocean village studio field snow night",
    "texture": "smooth rough wooden metallic glossy matte soft furry glass stone",
    "style": (
        "photorealistic oil_painting watercolor pencil_sketch cinematic_lighting high_resolution sharp_focus "
        "detailed_illustration soft_light digital_art vintage_photograph 4k"
    ),
    "action": "sitting standing running flying floating sleeping walking jumping reading",
    "relation": "next_to above below behind in_front_of inside near on_top_of",
    "count": "one two three four five six several many",
    "word": "hello world open sale coffee welcome stop love dream ditserve",
    "adjective": (
        "beautiful ancient modern quiet busy bright dark colorful elegant simple complex futuristic rustic "
        "cozy dramatic peaceful mysterious golden frozen misty sunny cloudy rainy autumn spring summer "
        "winter fresh old young happy serious curious gentle wild calm strong delicate shiny transparent "
        "ornate minimal abstract realistic surreal vivid pale deep warm cold wet dry empty crowded narrow "
        "wide tall short round flat"
    ),
    "noun": (
        "table window door garden road mountain valley lake island harbor market train station airport "
        "library museum temple tower wall fence roof floor ceiling lamp candle mirror painting statue "
        "fountain bench umbrella bicycle motorcycle truck airplane ship rocket planet moon sun cloud rain "
        "storm wave sand rock leaf branch grass field farm barn cow sheep rabbit fox wolf bear lion tiger "
        "elephant giraffe monkey owl eagle fish whale turtle butterfly bee spider guitar piano violin drum "
        "camera phone computer keyboard bottle glass plate bowl spoon knife bread cake pizza fruit banana "
        "orange strawberry hat shoe dress jacket scarf glove ring necklace crown sword shield helmet map "
        "letter sign poster banner"
    ),
    "verb": (
        "holding carrying watching painting building climbing swimming dancing singing playing cooking "
        "eating drinking writing drawing smiling laughing looking waiting riding driving pushing pulling "
        "opening wearing glowing shining melting burning growing falling rising"
    ),
    "common": (
        "and or but if then than because while when where which who what how why this that these those there "
        "here it its they them their we our you your he she his her is are was were be been has have had do "
        "does did can could will would should may might must not no yes very more most less some any each "
        "every all both few other such only same so too just also now again still always never often "
        "sometimes today tomorrow morning evening afternoon people family friend school teacher student "
        "doctor artist music movie story history science nature animal water fire earth air light shadow "
        "color shape size texture quantity text object scene view corner edge middle surface pattern detail "
        "style quality number picture drawing lens focus depth blur bokeh exposure contrast saturation "
        "brightness composition perspective symmetry reflection"
    ),
}
_TEMPLATES = (
    "a {size} {color} {shape} at the {position} of a {color} background",
    "A detailed photo of a {subject} {action} in the {place}, {style}.",
    "{count} {color} {shape}s on a {texture} {color} surface",
    'The word "{word}" written in {color} letters {relation} the {subject}',
    "portrait of a {subject} with a {color} {subject} {relation} it, {style}",
    "An image of a {texture} {subject} and a {size} {shape}; landscape, {style}",
    "the {adjective} {noun} is {verb} a {adjective} {noun} {relation} the {noun}",
    "Many {adjective} {noun}s with {color} {noun}s, {adjective} mood",
    " ".join(["{common}"] * 10) + ".",
)


def build_corpus(n: int = 1000, seed: int = 0) -> list[str]:
    """Returns the built-in deterministic English training corpus.

    Args:
        n: Number of template sentences; every 8th is also wrapped in the Qwen-Image prompt template,
            and lines of digits, letters and punctuation follow.
        seed: Seed of the private ``random.Random`` that fills the templates.

    Returns:
        The corpus lines, the same on every run.
    """
    rng = random.Random(seed)
    lists = {key: [w.replace("_", " ") for w in words.split()] for key, words in _LISTS.items()}
    fill = lambda m: rng.choice(lists[m[1]])  # noqa: E731
    lines = [re.sub(r"\{(\w+)\}", fill, _TEMPLATES[i % len(_TEMPLATES)]) for i in range(n)]
    lines += [QWEN_IMAGE_PROMPT_TEMPLATE.format(lines[i]) for i in range(0, n, 8)]
    return [*lines, "0 1 2 3 4 5 6 7 8 9 10 100 2024", string.ascii_letters, string.punctuation]


def _bytes_to_unicode() -> list[str]:
    """Returns GPT-2's printable stand-ins for the 256 bytes, in byte order (the real vocabs' first ids)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _words(proto: transformers.PreTrainedTokenizerBase) -> list[str]:
    """Splits the corpus into words with ``proto``'s own normalizer and pre-tokenizer."""
    backend = proto.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else str
    return [w for line in build_corpus() for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(line))]


def _train_bpe_merges(proto: transformers.PreTrainedTokenizerBase, end_of_word: bool) -> list[tuple]:
    """Trains byte-level BPE on the words of ``proto`` and returns the merges in order.

    With ``end_of_word`` the last symbol of a word carries the ``</w>`` suffix (CLIP). The trainer would
    number such symbols in hash order, so merge ties would break differently from run to run; a
    private-use character with a fixed id stands in for each suffixed byte and is mapped back after.
    """
    words, alphabet = _words(proto), _bytes_to_unicode()
    if end_of_word:
        words = [w[:-1] + chr(_EOW_SHIFT + ord(w[-1])) for w in words]
        alphabet += [chr(_EOW_SHIFT + ord(b)) for b in alphabet]
    tok = Tokenizer(models.BPE())  # no pre-tokenizer: each fed string is one word
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + _BPE_MERGES, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(words, trainer)
    unshift = {chr(_EOW_SHIFT + ord(b)): b + "</w>" for b in _bytes_to_unicode()}
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple("".join(unshift.get(ch, ch) for ch in part) for part in merge) for merge in merges]


def _bpe_vocab(base: list[str], merges: list[tuple], tail: tuple[str, ...] = ()) -> dict[str, int]:
    """Lays out a BPE vocab like the real files: base symbols, then merge results, then ``tail``."""
    return {token: i for i, token in enumerate(dict.fromkeys([*base, *(a + b for a, b in merges), *tail]))}


def build_qwen2_tokenizer() -> transformers.Qwen2Tokenizer:
    """Builds a small Qwen2 byte-level BPE tokenizer (about 1470 ids) with the Qwen2.5-VL special tokens.

    ``<|endoftext|>`` is unk, eos and pad (the ``Qwen2Tokenizer`` defaults; the real Qwen2.5-VL-Instruct
    tokenizer has ``<|im_end|>`` as eos). The special tokens are added tokens after the BPE vocab, as in
    the real one, and the Qwen-Image template prefix is 34 tokens, as the pipeline's ``drop_idx`` expects.

    Returns:
        The tokenizer; its ``save_pretrained`` folder reloads with ``Qwen2Tokenizer.from_pretrained``.
    """
    merges = _train_bpe_merges(transformers.Qwen2Tokenizer(), end_of_word=False)
    return transformers.Qwen2Tokenizer(
        vocab=_bpe_vocab(_bytes_to_unicode(), merges),
        merges=merges,
        extra_special_tokens=list(QWEN2_SPECIAL_TOKENS[1:]),
        model_max_length=131072,
    )


def qwen2_special_token_ids(tok: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """Returns the special token ids under the names Qwen2.5-VL configs use.

    ``bos_token_id`` and ``eos_token_id`` are those of the real Qwen2.5-VL model config
    (``<|endoftext|>``, ``<|im_end|>``), not the tokenizer's own eos (``<|endoftext|>``).

    Args:
        tok: A tokenizer from :func:`build_qwen2_tokenizer`, or its reloaded copy.

    Returns:
        ``bos/eos/pad_token_id``, ``image/video_token_id`` (``<|image_pad|>``, ``<|video_pad|>``), and
        ``<name>_token_id`` for vision_start, vision_end, vision_pad, im_start, im_end and endoftext.
    """
    ids = {t.strip("<|>"): tok.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_TOKENS}
    names = ("vision_start", "vision_end", "vision_pad", "im_start", "im_end", "endoftext")
    return {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["im_end"],
        "pad_token_id": tok.pad_token_id,
        "image_token_id": ids["image_pad"],
        "video_token_id": ids["video_pad"],
        **{f"{name}_token_id": ids[name] for name in names},
    }


def build_clip_tokenizer() -> transformers.CLIPTokenizer:
    """Builds a small CLIP BPE tokenizer (about 1710 ids; lower-cased, ``</w>`` suffix, max length 77).

    The vocab is laid out like openai's: the 256 bytes, the same with ``</w>``, the merge results, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (eos = pad = unk). Eos is the largest id, so ``CLIPTextModel``
    pools at the first eos both by ``config.eos_token_id`` and by the legacy argmax.

    Returns:
        The tokenizer; its ``save_pretrained`` folder reloads with ``CLIPTokenizer.from_pretrained``.
    """
    merges = _train_bpe_merges(transformers.CLIPTokenizer(), end_of_word=True)
    base = _bytes_to_unicode()
    vocab = _bpe_vocab([*base, *(b + "</w>" for b in base)], merges, ("<|startoftext|>", "<|endoftext|>"))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def clip_special_token_ids(tok: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """Returns ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``, ready for ``CLIPTextConfig(**ids)``.

    The config needs them: its default eos (49407) is out of range for a tiny vocab.

    Args:
        tok: A tokenizer from :func:`build_clip_tokenizer`, or its reloaded copy.

    Returns:
        The three ids; pad equals eos, as in the real CLIP tokenizer.
    """
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad")}


def build_t5_tokenizer() -> transformers.T5TokenizerFast:
    """Builds a small T5 Unigram tokenizer (about 1240 ids): ``<pad>``=0, ``</s>``=1, ``<unk>``=2.

    It appends ``</s>`` and has ``extra_ids=0`` (no ``<extra_id_*>`` sentinels; saved as such in
    ``tokenizer_config.json``), and no precompiled sentencepiece normalizer, unlike the real T5.
    ``UnigramTrainer`` seeds only substrings seen in two or more *distinct* words, so on a small corpus
    whole words never become pieces; each word is fed a second time with a trailing ``▁`` to fix that,
    and pieces ending in ``▁`` are dropped.

    Returns:
        The tokenizer (``T5TokenizerFast`` is ``T5Tokenizer`` in transformers 5), max length 512.
    """
    words = _words(transformers.T5TokenizerFast(extra_ids=0))
    tok = Tokenizer(models.Unigram())  # no pre-tokenizer: each fed string is one word
    trainer = trainers.UnigramTrainer(
        vocab_size=_UNIGRAM_VOCAB,
        special_tokens=list(T5_SPECIAL_TOKENS),
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tok.train_from_iterator([v for w in words for v in (w, w + "▁")], trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    if tuple(p for p, _ in vocab[:3]) != T5_SPECIAL_TOKENS:
        raise RuntimeError(f"unexpected first T5 pieces: {vocab[:3]}")
    # Same files on every run: EM sums floats in thread order (so round), and the characters EM dropped
    # score lowest + k * 1e-4 with k in hash order (so all get the lowest score); then sort.
    scores = {p: round(s, 6) for p, s in vocab[3:] if p == "▁" or not p.endswith("▁")}
    low = min(scores.values())
    band = low + 1e-4 * (1 + sum(len(p) == 1 for p in scores))
    pieces = sorted((-(low if s < band else s), p) for p, s in scores.items())
    vocab = [*((p, 0.0) for p in T5_SPECIAL_TOKENS), *((p, -s) for s, p in pieces)]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def t5_special_token_ids(tok: transformers.PreTrainedTokenizerBase) -> dict[str, int]:
    """Returns ``pad_token_id`` (0), ``eos_token_id`` (1) and ``unk_token_id`` (2), named as in ``T5Config``.

    Args:
        tok: A tokenizer from :func:`build_t5_tokenizer`, or its reloaded copy.
    """
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("pad", "eos", "unk")}


# GLM-Image's processor tokens: the user/assistant turn markers, the image placeholder, the grid
# brackets of the target shape ("<sop>H W<eop>"), the image begin/end markers of source images, and
# the DiT-token start/end (the prior's bos, which its rope index finds as ``image_start_token_id``, and
# its eos, ``image_end_token_id``). The names are the real tokenizer's; the ids are this small one's.
GLM_IMAGE_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
    "<sop>", "<eop>", "<|dit_token_16384|>", "<|dit_token_16385|>",
)  # fmt: skip
GLM_IMAGE_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|user|>\n{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- else %}{{ item['text'] }}{%- endif %}{%- endfor %}{%- endfor %}<|assistant|>\n"
)


def build_glm_image_tokenizer(extra_tokens: tuple[str, ...] = ()) -> transformers.Qwen2Tokenizer:
    """Builds a small byte-level BPE tokenizer for ``GlmImageProcessor`` (the Qwen2 one's vocab and
    merges, with GLM-Image's special tokens after them, then ``extra_tokens``).

    ``GlmImageProcessor`` reads ``image_token``, ``grid_bos_token`` and ``grid_eos_token`` from the
    tokenizer (saved as its ``extra_special_tokens``) and appends its ``bos_token`` (the DiT-token
    start) to every prompt.
    """
    merges = _train_bpe_merges(transformers.Qwen2Tokenizer(), end_of_word=False)
    tok = transformers.Qwen2Tokenizer(
        vocab=_bpe_vocab(_bytes_to_unicode(), merges),
        merges=merges,
        bos_token="<|dit_token_16384|>",
        eos_token="<|dit_token_16385|>",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
        model_max_length=131072,
    )
    rest = [t for t in (*GLM_IMAGE_SPECIAL_TOKENS, *extra_tokens) if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": rest}, replace_extra_special_tokens=False)
    return tok
