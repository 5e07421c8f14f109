"""Modality names as the official MCP-MedSAM pipeline reads them from CVPR24 file names.

Torch-free: shared by the runtime, the export (which bakes one modality token per accepted
string into the graph) and training (which samples by modality).
"""

from __future__ import annotations

from pathlib import Path

from .errors import UnknownModality

# Official category indices (the order of the modality embedding table and classifier).
CATEGORIES: tuple[str, ...] = (
    "CT", "MR", "Endoscopy", "XRay", "PET", "Dermoscopy", "Mammography", "US", "OCT", "Fundus", "Microscopy",
)

# Every file-name token the official pipeline accepts, with its category index. The official
# code builds the CLIP text "<token> Image" from the raw token (only "Microscope" is renamed to
# "Microscopy"), so aliases with the same index can still have different text features.
ACCEPTED: dict[str, int] = {
    "CT": 0, "MR": 1, "Endoscopy": 2, "XRay": 3, "X-Ray": 3, "PET": 4, "Dermoscopy": 5,
    "Mammography": 6, "Mammo": 6, "US": 7, "OCT": 8, "Fundus": 9, "Microscopy": 10, "Microscope": 10,
}


# Names users say for a modality that are no file-name token of the official pipeline: each maps to the
# token whose CLIP text the model was trained with (an alias keeps no text of its own).
ALIASES: dict[str, str] = {"MRI": "MR", "Ultrasound": "US"}


def modality_token(name: str) -> str:
    """The modality token of a case file name: the token after ``2DBox_``/``3DBox_``.

    ``2DBox_XRay_Shenzhen_x.npz`` -> ``XRay``. Names without that prefix use their first token
    (the official training loader does the same).
    """
    parts = Path(name).name.split("_")
    if len(parts) > 1 and parts[0] in ("2DBox", "3DBox", "2D", "3D"):
        return parts[1]
    return parts[0]


def accepted_token(modality: str) -> str:
    """The accepted token a user's modality string names: exact (``X-Ray`` and ``XRay`` are both
    tokens, with their own CLIP texts), else the one token equal to it ignoring case (``ct`` -> ``CT``),
    else the token of an alias of :data:`ALIASES`, case ignored (``MRI`` -> ``MR``).

    Raises UnknownModality listing the accepted tokens and aliases.
    """
    if modality in ACCEPTED:
        return modality
    folded = [t for t in ACCEPTED if t.casefold() == str(modality).casefold()]
    if len(folded) == 1:
        return folded[0]
    aliased = [t for a, t in ALIASES.items() if a.casefold() == str(modality).casefold()]
    if aliased:
        return aliased[0]
    raise UnknownModality(f"unknown modality {modality!r}; accepted: {', '.join(ACCEPTED)} "
                          f"(also {', '.join(ALIASES)})")


def category_index(token: str) -> int:
    try:
        return ACCEPTED[token]
    except KeyError:
        raise UnknownModality(
            f"unknown modality {token!r}; accepted: {', '.join(ACCEPTED)}"
        ) from None


def clip_text(token: str) -> str:
    """The CLIP text of a modality token, as the official inference builds it."""
    return f"{'Microscopy' if token == 'Microscope' else token} Image"


def canonical(token: str) -> str:
    """The canonical category name of an accepted token (``Mammo`` -> ``Mammography``)."""
    return CATEGORIES[category_index(token)]
