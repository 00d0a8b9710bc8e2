"""A text cut into training, validation and test text: its tokens (the token cache) and where each split begins,
in tokens and in characters. The data module serves windows of it; the yardsticks, evaluate.py and the report
measure its held-out splits. Plain Python, without Lightning: the report reads it, and starts in seconds."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from shakespeare.data.corpus import fetch_corpus, text_files
from shakespeare.data.token_cache import BPESettings, TokenCache, character_cuts, load_tokens
from shakespeare.tokenizer import Tokenizer, tokenizer_for


class SplitText:
    """The tokens of `path`'s files (a file, folder or glob), or of the corpus at `url` (downloaded and verified
    only if its tokens are not cached yet: they are keyed by its published SHA-256), cut at characters whatever
    the unit, so char, byte and BPE runs hold out the same text: the last `test_fraction` of the characters is the
    test text, the `val_fraction` before it the validation text. With `split="random_windows"` the validation
    windows are drawn from all the text before the test split, which then holds no validation text out.

    The settings are the data module's, which checks them."""

    def __init__(
        self,
        path: str | None = None,
        url: str = "",
        sha256: str = "",
        file: str | None = None,
        archive_sha256: str | None = None,
        unit: str = "char",
        vocab_size: int | None = None,
        cache_dir: str = "~/.cache/shakespeare",
        split: str = "contiguous",
        val_fraction: float = 0.1,
        test_fraction: float | None = None,
    ):
        self.path, self.url, self.sha256, self.file, self.archive_sha256 = path, url, sha256, file, archive_sha256
        self.unit, self.vocab_size, self.cache_dir = unit, vocab_size, cache_dir
        self.split, self.val_fraction, self.test_fraction = split, val_fraction, test_fraction
        self.cache: TokenCache | None = None
        self._tokenizer: Tokenizer | None = None
        self.cuts: tuple[int, int] | None = None  # (val_cut, test_cut): the tokens where validation and test begin
        self.character_cuts: tuple[int, int] | None = None  # the same places in characters, whatever the unit

    @classmethod
    def of(cls, settings: Mapping) -> SplitText:
        """From a data module's settings (a run's recorded `data`): those that only shape windows are left out."""
        names = inspect.signature(cls).parameters
        return cls(**{key: value for key, value in settings.items() if key in names})

    def load_tokens(self) -> TokenCache:
        """The text's token cache: `path`'s files, or the corpus at `url`, which is downloaded and verified only if
        its tokens are not cached yet."""
        bpe = self.bpe_settings()
        if self.path:
            return load_tokens(text_files(self.path), self.unit, self.cache_dir, bpe=bpe)
        fetch = lambda: [  # noqa: E731
            fetch_corpus(self.url, self.sha256, self.cache_dir, self.file, self.archive_sha256)
        ]
        return load_tokens(fetch, self.unit, self.cache_dir, digests=[self.sha256], bpe=bpe)

    def bpe_settings(self) -> BPESettings | None:
        """A BPE's size and the text it is trained on: the training text, the text before the validation split
        (before the test split for random_windows, whose training windows are drawn from the validation text too)."""
        if self.unit != "bpe":
            return None
        return BPESettings(self.vocab_size, self.val_fraction, self.test_fraction, self.split == "random_windows")

    @property
    def has_test_split(self) -> bool:
        return bool(self.test_fraction)

    @property
    def tokenizer(self) -> Tokenizer:
        self.setup()
        return self._tokenizer

    def setup(self) -> None:
        """Open (or encode) the token cache and find the cuts, once."""
        if self.cache is not None:
            return
        cache = self.load_tokens()
        tokenizer = tokenizer_for(cache.vocabulary, cache.definition)
        cuts = character_cuts(cache.characters, self.val_fraction, self.test_fraction)
        self.cuts = tuple(cache.token_at(cut, tokenizer.characters) for cut in cuts)
        self.cache, self._tokenizer, self.character_cuts = cache, tokenizer, cuts

    def __getstate__(self) -> dict:
        """Pickled (e.g. for ddp_spawn's processes) without its tokens: each process maps the cache itself."""
        return {**self.__dict__, "cache": None, "_tokenizer": None}
