"""The built-in task's independent checker: recomputes a question's answer from the scene and the
question *text*, with its own code. It shares nothing with scl/task.py's builders but the value names,
and returns None when the answer is not unique (two largest shapes, two anchors, a tie for most common,
an empty cell). It lives with the tests because it is their oracle, not part of the product."""
import re
from collections import Counter

from scl.prompts import LETTERS
from scl.task import CELLS

_ANSWERS = [
    (r"How many shapes are there in total minus the (\w+) ones\?",
     lambda s, c: str(len(s) - [o["colour"] for o in s].count(c))),
    (r"How many (\w+) shapes are there\?", lambda s, c: str([o["colour"] for o in s].count(c))),
    (r"How many (\w+)s are there\?", lambda s, sh: str([o["shape"] for o in s].count(sh))),
    (r"What (colour) is the shape at the ([\w-]+)\?|What (shape) is at the ([\w-]+)\?", "at"),
    (r"What (colour) is the largest shape\?|What (shape) is the largest object\?", "largest"),
    (r"Which (colour) do most shapes have\?|Which (shape) is the most common\?", "most"),
    (r"What (colour) is the shape directly ([\w ]+?) the (\w+) (\w+)\?|"
     r"What (shape) is directly ([\w ]+?) the (\w+) (\w+)\?", "relation"),
]


def _solve(scene, question):
    grid = {(o["cell"] // 3, o["cell"] % 3): o for o in scene}
    for pattern, how in _ANSWERS:
        m = re.fullmatch(pattern, question)
        if not m:
            continue
        args = [g for g in m.groups() if g is not None]
        if callable(how):
            return how(scene, *args)
        attr = args[0]
        if how == "at":
            cell = CELLS.index(args[1])
            o = grid.get((cell // 3, cell % 3))
            return o and o[attr]
        if how == "largest":
            big = [o for o in scene if o["size"] == "large"]
            return big[0][attr] if len(big) == 1 else None
        if how == "most":
            ranked = Counter(o[attr] for o in scene).most_common()
            return ranked[0][0] if len(ranked) == 1 or ranked[0][1] > ranked[1][1] else None
        step = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[args[1]]
        anchors = [rc for rc, o in grid.items() if (o["colour"], o["shape"]) == (args[2], args[3])]
        o = grid.get((anchors[0][0] + step[0], anchors[0][1] + step[1])) if len(anchors) == 1 else None
        return o and o[attr]
    return None


def check_answer(scene, question, options):
    """The gold letter of a question about `scene`, or None when no single option is right."""
    value = _solve(scene, question)
    return LETTERS[options.index(value)] if value in options and options.count(value) == 1 else None
