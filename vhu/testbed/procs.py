"""Process trees from /proc: which pids a back-end under test holds."""
import os
from typing import List


def process_tree(pid: int) -> List[int]:
    """pid and all its descendants (workers, multiprocessing's resource tracker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass                     # gone meanwhile
    return out


def descendants(pid: int) -> List[int]:
    """pid's descendants, without pid itself (a master's workers)."""
    return [p for p in process_tree(pid) if p != pid]
