"""Charts of the race (perf/race.py's JSON) as PNG, with matplotlib (the
`perf` extra: pip install -e '.[perf]').

    python perf/plot.py [--json perf/race.json] [-o perf/race.png]

One panel per ring layout and queue count, one group of bars per row and
frame size, one bar per back-end found in the entries (vhu, DPDK, and any
other a race wrote: Open vSwitch, Snabb, ...): the median Mpps, with the
lowest and highest run as the error bar. A back-end whose run failed shows
'failed' where its bar would be. Rates are read at the front-end, as in
perf/RESULTS.md.
"""
import argparse
import json
import sys

# Known back-ends, in the order bars are drawn, with their names and colours;
# any other back-end key in an entry follows them, named by its key.
BACKENDS = {"vhu": ("vhu", "#1f77b4"), "dpdk": ("DPDK vhost", "#ff7f0e"),
            "ovs": ("Open vSwitch", "#2ca02c"), "snabb": ("Snabb", "#9467bd")}
OTHER_COLOURS = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
ROW_NAMES = {"sink": "sink / txonly", "source": "source / rxonly", "echo": "echo / io",
             "switch": "switch / 2 ports", "patch": "patch / 2 ports"}


def backends(entries):
    """Back-end keys present in the entries: those whose value is a dict of
    results (a rate, runs or an error), known ones first."""
    found = []
    for e in entries:
        for k, v in e.items():
            if isinstance(v, dict) and ({"mpps", "runs_mpps", "error"} & v.keys()) and k not in found:
                found.append(k)
    return sorted(found, key=lambda k: (list(BACKENDS).index(k) if k in BACKENDS else len(BACKENDS),
                                        found.index(k)))


def label(key):
    return BACKENDS.get(key, (key, None))[0]


def spread(side):
    """(median, below, above): the median Mpps and the distances down to the
    slowest and up to the fastest run; None if there is no rate."""
    m = side.get("mpps")
    if m is None:
        return None
    runs = side.get("runs_mpps") or [m]
    return m, max(m - min(runs), 0.0), max(max(runs) - m, 0.0)


def panels(entries):
    """Entries grouped by (ring, queues), in the order the race ran them."""
    out = {}
    for e in entries:
        out.setdefault((e.get("ring", "split"), e.get("queues", 1)), []).append(e)
    return out


def figure(doc):
    """A matplotlib Figure of the race document (no pyplot, no display)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    entries = doc["results"]
    names = backends(entries)
    groups = panels(entries)
    colours = {k: BACKENDS[k][1] if k in BACKENDS else OTHER_COLOURS[i % len(OTHER_COLOURS)]
               for i, k in enumerate(n for n in names if n not in BACKENDS)}
    colours.update({k: BACKENDS[k][1] for k in names if k in BACKENDS})
    widest = max(len(g) for g in groups.values())
    fig = Figure(figsize=(max(7.0, 1.2 * widest * max(len(names), 2) / 2 + 2), 3.2 * len(groups) + 1.2),
                 dpi=110, layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    top = max((s[0] + s[2] for e in entries for k in names
               if (s := spread(e.get(k, {}))) is not None), default=1.0)
    width = 0.8 / max(len(names), 1)
    for ax, ((ring, queues), rows) in zip(axes, groups.items()):
        xs = range(len(rows))
        for j, key in enumerate(names):
            pos = [x - 0.4 + width * (j + 0.5) for x in xs]
            got = [spread(e.get(key, {})) for e in rows]
            have = [(p, s) for p, s in zip(pos, got) if s]
            if have:                       # no bar (and no zero-height cap) where nothing ran
                ax.bar([p for p, _ in have], [s[0] for _, s in have], width * 0.92,
                       yerr=[[s[1] for _, s in have], [s[2] for _, s in have]], capsize=3,
                       color=colours[key], label=label(key),
                       error_kw={"elinewidth": 1, "ecolor": "#333333"})
            for p, s, e in zip(pos, got, rows):
                if s:
                    ax.text(p, s[0] + s[2] + top * 0.01, f"{s[0]:.1f}", ha="center", va="bottom",
                            fontsize=7)
                elif key in e:
                    ax.text(p, top * 0.02, "failed", ha="center", va="bottom", fontsize=7,
                            rotation=90, color="#b00000")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{ROW_NAMES.get(e['row'], e['row'])}\n{e['pkt_size']} B" for e in rows],
                           fontsize=8)
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("Mpps")
        ax.set_title(f"{ring} ring, {queues} queue pair{'s' if queues != 1 else ''}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].legend(handles=[Patch(color=colours[k], label=label(k)) for k in names],
                   loc="upper right", fontsize=8, ncols=len(names))
    m = doc.get("machine", {})
    fig.suptitle(f"{' vs '.join(label(k) for k in names)}: race of {doc.get('time', '?')}\n"
                 f"median of the runs, bars from the slowest to the fastest run; "
                 f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores", fontsize=10)
    return fig


def plot(doc, path):
    """Write the race document's chart as a PNG file at path."""
    figure(doc).savefig(path, format="png")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="perf/race.json", help="the race's JSON (perf/race.py --json)")
    ap.add_argument("-o", "--output", default="perf/race.png", help="PNG file to write")
    a = ap.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    print(plot(doc, a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
