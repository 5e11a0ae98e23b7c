r"""What DeCLIP's nearest-neighbour supervision (NNS) is given on `shapes:N`, and what EDA's
synonym replacement would do to its captions.

  python -m clipjax.tools.declip_neighbours --workdir=/tmp/study/runs/shapes_2000/declip/s0

For every training pair, the queue row nearest to its caption is sorted into: the pair's own
caption, another pair's caption with the same objects (colours and shapes), one sharing an
object, or one sharing none. Then again with the pair's own rows left out of the search.

The run's text tower embeds the queue as it stands after an epoch when the queue holds more
rows than there are pairs (as at `shapes:2000` with the `:local` queue of 4,096): each pair's
caption and one EDA rewrite of it (the trainer enqueues the MLM-masked caption and an EDA
rewrite). Each query is another EDA rewrite; EDA here swaps and deletes words (no WordNet).

When NLTK's WordNet is installed, it also reports how often synonym replacement (the EDA
operation that needs it) replaces a colour or shape word of the captions.
"""

import collections

import numpy as np
from absl import app, flags

import clipjax
from clipjax import config as config_lib
from clipjax.data import sources, text_ops
from clipjax.data.shapes import COLORS, SHAPES, ShapesSource


def neighbour_kinds(queries, queue, owner, contents, *, skip_own: bool) -> collections.Counter:
    """Counts of how each query's nearest queue row relates to the query's pair.

    `queries` (n, d) and `queue` (m, d) are unit embeddings; `owner` (m,) the pair of each
    queue row; `contents[i]` the set of (colour, shape) of pair i's objects."""
    scores = queries @ queue.T
    if skip_own:
        scores[np.arange(len(queries))[:, None] == owner[None, :]] = -np.inf
    kinds = collections.Counter()
    for pair, row in enumerate(np.argmax(scores, axis=1)):
        other = owner[row]
        if other == pair:
            kinds["the pair's own caption"] += 1
        elif contents[other] == contents[pair]:
            kinds["another pair, the same objects"] += 1
        elif contents[other] & contents[pair]:
            kinds["another pair, sharing an object"] += 1
        else:
            kinds["another pair, no object in common"] += 1
    return kinds


def content_words_replaced(captions, lexicon, rng) -> float:
    """The fraction of synonym-replacement rewrites that lose a colour or shape word."""
    words = set(COLORS) | set(SHAPES)

    def content(text):
        return sorted(w for w in text.replace(".", " ").replace(",", " ").split() if w in words)

    lost = 0
    for caption in captions:
        rewrite = " ".join(text_ops.synonym_replacement(caption.split(), rng, lexicon))
        lost += content(rewrite) != content(caption)
    return lost / len(captions)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    workdir = flags.FLAGS.workdir
    train = config_lib.load_saved(workdir).data.train
    scheme, size, options = sources.parse_spec(train)
    if scheme != "shapes" or not size.isdigit():
        raise app.UsageError(f"{workdir} trained on {train!r}; this tool reads shapes:N runs.")
    source = ShapesSource("train", size=int(size), seed=int(options.get("seed", 0)))
    captions = list(source.captions(len(source)))
    contents = [source.contents(i) for i in range(len(source))]
    rng = np.random.default_rng(flags.FLAGS.seed)
    rewrites = [[text_ops.eda(c, rng, lexicon=None) for c in captions] for _ in range(2)]

    model = clipjax.load(workdir)

    def embed(texts):
        return model.encode_text(model.tokenize(texts))

    queue = np.concatenate([embed(captions), embed(rewrites[0])])
    owner = np.tile(np.arange(len(captions)), 2)
    queries = embed(rewrites[1])
    for skip_own in (False, True):
        kinds = neighbour_kinds(queries, queue, owner, contents, skip_own=skip_own)
        title = "own rows left out" if skip_own else "the whole queue"
        print(f"{title} ({len(queue)} rows, {len(queries)} queries):")
        for kind, count in kinds.most_common():
            print(f"  {kind}: {100 * count / len(queries):.1f}%")
    lexicon = text_ops.wordnet_lexicon()
    if lexicon is None:
        print("synonym replacement: WordNet is not installed, not measured")
    else:
        share = content_words_replaced(captions, lexicon, rng)
        print(f"synonym replacement: a colour or shape word replaced in {100 * share:.1f}%")


def _define_flags() -> None:
    # Defined here, not on import, so that importing this module adds no global flags.
    flags.DEFINE_string("workdir", None, "Workdir of a DeCLIP run trained on shapes:N.")
    flags.DEFINE_integer("seed", 0, "Seed of the EDA rewrites.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
