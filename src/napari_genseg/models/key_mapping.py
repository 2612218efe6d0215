"""State-dict key handling shared by every official-checkpoint importer (pure: no torch, no I/O).

One policy for every family (``models/<family>/importer.py``):

1. Wrapper prefixes go first: ``module.`` (``nn.DataParallel`` / DDP) and ``_orig_mod.``
   (``torch.compile``), in any order and nesting (:func:`strip_prefixes`).
2. Keys the importer knows are renamed by its declarative table.
3. Keys the importer knows this model does not use (a documented group, e.g. SAM's prompt encoder)
   are dropped and counted, one note per group (:class:`KeyMap`).
4. Every other key is **kept unchanged**. The loader
   (:func:`napari_genseg.models.checkpoints.load_state_dict_report`) then lists it as *unexpected*,
   and ``genseg import`` refuses to write a checkpoint whose report is not clean unless
   ``--allow-partial`` is given. No importer silently drops a key it does not know.

The idea follows timm's ``checkpoint_filter_fn`` (rename tables) and SAM's loader (strip
``image_encoder.`` to load the encoder alone).
"""

from __future__ import annotations

__all__ = ["WRAPPER_PREFIXES", "strip_prefixes", "KeyMap"]

#: prefixes added by training wrappers, never part of a module name
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state_dict: dict, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict:
    """A new dict whose keys have every leading ``prefixes`` entry removed (repeatedly, so
    ``module._orig_mod.x`` -> ``x``). Values are not copied; key order is kept.

    Example: ``strip_prefixes(sam_sd, ("image_encoder.",))`` gives a SAM encoder's own keys.
    Raises ``ValueError`` when two keys collapse onto one name (a file holding both a wrapped and
    an unwrapped copy), instead of keeping one of them silently.
    """
    out: dict = {}
    for key, value in state_dict.items():
        k = key
        stripped = True
        while stripped:
            stripped = False
            for p in prefixes:
                if k.startswith(p):
                    k = k[len(p):]
                    stripped = True
        if k in out:
            raise ValueError(f"keys collide after removing {', '.join(prefixes)}: {key!r} -> {k!r}")
        out[k] = value
    return out


class KeyMap:
    """Collects an importer's output under the policy above: ``put`` a mapped key, ``drop`` a key
    of a known unused group, ``keep_unknown`` a key the importer does not recognise (kept as is, so
    the load report shows it as unexpected). ``notes()`` says what was dropped and kept."""

    def __init__(self) -> None:
        self.out: dict = {}
        self.dropped: dict[str, int] = {}
        self.unknown: list[str] = []

    def put(self, key: str, value) -> None:
        self.out[key] = value

    def drop(self, group: str) -> None:
        self.dropped[group] = self.dropped.get(group, 0) + 1

    def keep_unknown(self, key: str, value) -> None:
        self.unknown.append(key)
        self.out[key] = value

    def notes(self) -> list[str]:
        notes = [f"dropped {n} key(s): {group}" for group, n in self.dropped.items()]
        if self.unknown:
            shown = ", ".join(self.unknown[:5]) + (" ..." if len(self.unknown) > 5 else "")
            notes.append(f"{len(self.unknown)} unrecognised key(s) kept as they are (reported as "
                         f"unexpected): {shown}")
        return notes
