"""A transient progress bar over the tokens a generate still has to produce."""

from __future__ import annotations


class Progress:
    """A rich bar over the tokens still to generate (early stops count as done)."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(transient=True)
        self._task = self._bar.add_task("generating", total=total)
        self._bar.start()

    def advance(self, n: int) -> None:
        self._bar.update(self._task, advance=n)

    def close(self) -> None:
        self._bar.stop()


__all__ = ["Progress"]
