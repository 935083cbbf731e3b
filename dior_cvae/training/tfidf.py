"""Word 1-2-gram TF-IDF vectors and cosine search, on torch sparse tensors (no scikit-learn or scipy needed).

The features follow scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2))`` defaults: the text is lowercased,
tokens are runs of two or more word characters (``\\b\\w\\w+\\b``), features are the unigrams and the bigrams of
adjacent tokens, term frequency is the raw count, ``idf = ln((1 + N) / (1 + df)) + 1`` over the N fitted
documents, and every vector is L2-normalised, so a dot product is a cosine. Terms unseen at fit time are ignored.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence

import torch

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def word_ngrams(text: str) -> list[str]:
    """The lowercased word unigrams and bigrams of ``text`` (bigrams joined by one space)."""
    tokens = _TOKEN.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


class TfidfIndex:
    """TF-IDF vectors of ``documents`` (idf fitted on them) and cosine search of other texts against them."""

    def __init__(self, documents: Sequence[str]):
        if not documents:
            raise ValueError("TfidfIndex needs at least one document")
        counts = [Counter(word_ngrams(doc)) for doc in documents]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        self.vocabulary = {term: i for i, term in enumerate(sorted(df))}
        n = len(documents)
        self.idf = [math.log((1 + n) / (1 + df[t])) + 1.0 for t in sorted(df)]
        self.matrix = self._vectors(counts)  # CSR, documents x terms
        self._matrix_t = self.matrix.to_sparse_coo().t().coalesce().to_sparse_csr()  # terms x documents

    def _vectors(self, counts: Sequence[Counter]) -> torch.Tensor:
        """L2-normalised TF-IDF rows (sparse CSR, float64) of the given term counts."""
        crow, cols, vals = [0], [], []
        for c in counts:
            items = sorted((self.vocabulary[t], n) for t, n in c.items() if t in self.vocabulary)
            weights = [n * self.idf[j] for j, n in items]
            norm = math.sqrt(sum(w * w for w in weights)) or 1.0
            cols.extend(j for j, _ in items)
            vals.extend(w / norm for w in weights)
            crow.append(len(cols))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            return torch.sparse_csr_tensor(
                torch.tensor(crow, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64),
                torch.tensor(vals, dtype=torch.float64), size=(len(counts), len(self.vocabulary)),
                check_invariants=False,
            )  # fmt: skip

    def transform(self, texts: Sequence[str]) -> torch.Tensor:
        """TF-IDF rows (sparse CSR) of ``texts`` in this index's vocabulary and idf."""
        return self._vectors([Counter(word_ngrams(t)) for t in texts])

    def cosine(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Dense ``len(texts) x len(documents)`` cosine similarities (float64), computed in batches of texts."""
        rows = []
        for start in range(0, len(texts), batch_size):
            rows.append((self.transform(texts[start : start + batch_size]) @ self._matrix_t).to_dense())
        return torch.cat(rows) if rows else torch.zeros(0, self.matrix.shape[0], dtype=torch.float64)

    def top_k(self, texts: Sequence[str], k: int, batch_size: int = 256) -> list[list[tuple[int, float]]]:
        """For each text the ``k`` most similar documents as ``(index, cosine)``, most similar first; equal cosines
        in index order (a stable sort), so the result is deterministic."""
        if not 1 <= k <= self.matrix.shape[0]:
            raise ValueError(f"k must be in [1, {self.matrix.shape[0]}] (the number of documents), got {k}")
        result = []
        for start in range(0, len(texts), batch_size):
            sims = self.cosine(texts[start : start + batch_size], batch_size)
            order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
            values = sims.gather(1, order)
            result.extend([list(zip(i, v)) for i, v in zip(order.tolist(), values.tolist())])
        return result
