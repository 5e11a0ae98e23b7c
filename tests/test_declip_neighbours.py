"""The DeCLIP text diagnostics: nearest queue rows sorted by relation, and content words lost."""

import numpy as np

from clipjax.tools.declip_neighbours import content_words_replaced, neighbour_kinds


def test_neighbour_kinds_sorts_nearest_rows_and_can_leave_own_rows_out():
    contents = [
        frozenset({("red", "circle")}),
        frozenset({("red", "circle")}),
        frozenset({("red", "circle"), ("blue", "star")}),
        frozenset({("green", "cross")}),
    ]
    # Unit queries. Queue rows 0-3 are the pairs' own captions; row 4 + j, also owned by pair
    # j, lies 0.9 along the next pair's query, so without its own rows query i's nearest row
    # is 4 + (i - 1) mod 4, owned by pair i - 1.
    queries = np.eye(4)
    queue = np.concatenate([np.eye(4), 0.9 * np.eye(4)[[1, 2, 3, 0]]])
    owner = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    whole = neighbour_kinds(queries, queue, owner, contents, skip_own=False)
    assert whole == {"the pair's own caption": 4}
    left_out = neighbour_kinds(queries, queue, owner, contents, skip_own=True)
    assert left_out == {
        "another pair, no object in common": 2,  # query 0 -> pair 3, query 3 -> pair 2
        "another pair, the same objects": 1,  # query 1 -> pair 0
        "another pair, sharing an object": 1,  # query 2 -> pair 1
    }


def test_content_words_replaced_counts_rewrites_that_lose_a_colour_or_shape():
    lexicon = {"red": ("crimson",), "photo": ("picture",), "star": ("asterisk",)}.get
    captions = [
        "a red circle.",  # only "red" has a synonym: always replaced
        "a photo of a blue square",  # only "photo": the colour and shape stay
        "a star, blue",  # only "star": always replaced
        "a green cross",  # nothing to replace
    ]
    rng = np.random.default_rng(0)
    assert content_words_replaced(captions, lambda w: lexicon(w, ()), rng) == 0.5
