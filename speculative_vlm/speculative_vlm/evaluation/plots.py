"""Top-down plots of a run in the simulated Go2's world: the robot's path, the objects, the goal.

People would rather look than read coordinates. :func:`plot_topdown` draws onto any matplotlib
axes (so a report can put several runs side by side); :func:`save_topdown_png` draws one run into
a PNG file. The main job (``speculative-vlm up``) saves one at its end, and the closed-loop
evaluation's trajectory plots are meant to use the same function.

Coordinates are the scene's (= the simulated robot's odometry frame, REP 103): x forward from the
start pose, drawn to the right; y to the left, drawn upwards. Matplotlib is used through
:class:`~matplotlib.figure.Figure` and its Agg canvas, never pyplot, so saving needs no display
and does not change the process's backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from speculative_vlm.go2.scene import Room, SceneObject

Point = tuple[float, float]


def plot_topdown(
    ax,
    path: Sequence[Point],
    objects: Iterable[SceneObject],
    goal: SceneObject | None = None,
    *,
    room: Room | None = None,
    title: str = "",
    end_yaw: float | None = None,
) -> None:
    """Draw a run seen from above onto ``ax`` (a matplotlib Axes).

    ``path`` is the robot's positions in order (metres, scene frame); it starts with a circle and
    ends with a triangle pointing along ``end_yaw`` (the robot's final heading, radians; None =
    the direction of the last movement). ``objects`` are drawn to scale in their own colour and
    named; ``goal`` (one of them, or any object) is ringed and named as the goal. ``room`` draws
    the walls.
    """
    from matplotlib.patches import Circle, Rectangle, RegularPolygon

    if room is not None:
        ax.add_patch(Rectangle((room.x_min, room.y_min), room.x_max - room.x_min, room.y_max - room.y_min,
                               fill=False, edgecolor="0.3", linewidth=1.5, label="walls"))
    for obj in objects:
        colour = tuple(c / 255 for c in obj.colour)
        if obj.shape == "box":
            patch = Rectangle((obj.x - obj.size / 2, obj.y - obj.size / 2), obj.size, obj.size)
        elif obj.shape == "cone":
            patch = RegularPolygon((obj.x, obj.y), numVertices=3, radius=obj.size)
        else:
            patch = Circle((obj.x, obj.y), obj.size)
        patch.set(facecolor=colour, edgecolor="black", linewidth=0.8, zorder=2)
        ax.add_patch(patch)
        ax.annotate(obj.name, (obj.x, obj.y), xytext=(6, 6), textcoords="offset points", fontsize=8)
    if goal is not None:
        ring = max(0.35, 2.5 * goal.size)
        ax.add_patch(Circle((goal.x, goal.y), ring, fill=False, edgecolor="tab:orange", linewidth=2.0,
                            linestyle="--", zorder=3, label=f"goal: {goal.name}"))
    if path:
        xs, ys = [p[0] for p in path], [p[1] for p in path]
        ax.plot(xs, ys, color="tab:blue", linewidth=1.8, zorder=4, label="robot path (odom)")
        ax.plot(xs[:1], ys[:1], "o", color="tab:green", markersize=7, zorder=5, label="start")
        heading = _heading(path) if end_yaw is None else end_yaw
        ax.plot(xs[-1:], ys[-1:], marker=(3, 0, math.degrees(heading) - 90), linestyle="none",
                color="tab:red", markersize=9, zorder=5, label="end")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x (m, forward from the start)")
    ax.set_ylabel("y (m, left)")
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)


def save_topdown_png(
    out: str | Path,
    path: Sequence[Point],
    objects: Iterable[SceneObject],
    goal: SceneObject | None = None,
    *,
    room: Room | None = None,
    title: str = "",
    end_yaw: float | None = None,
    dpi: int = 120,
) -> Path:
    """Draw one run with :func:`plot_topdown` and write it as a PNG to ``out``; returns the path.

    Missing parent folders are created.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.0, 5.6))
    FigureCanvasAgg(fig)
    plot_topdown(fig.add_subplot(), path, objects, goal, room=room, title=title, end_yaw=end_yaw)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _heading(path: Sequence[Point]) -> float:
    """Direction of the last movement along ``path`` (radians); 0 (forward) if it never moved."""
    end = path[-1]
    for p in reversed(path[:-1]):
        if math.hypot(end[0] - p[0], end[1] - p[1]) > 0.02:
            return math.atan2(end[1] - p[1], end[0] - p[0])
    return 0.0
