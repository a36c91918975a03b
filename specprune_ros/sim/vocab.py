"""The fixed language of the tabletop tasks: colours, shapes, zone names and instruction templates."""
from __future__ import annotations

COLOURS: tuple[str, ...] = ('red', 'green', 'blue', 'yellow')
SHAPES: tuple[str, ...] = ('cube', 'cylinder')
ZONE_SIDES: tuple[str, ...] = ('left', 'right')     # seen from the robot / the agentview camera

# RGBA used for rendering each colour name (objects and plates).
COLOUR_RGBA: dict[str, tuple[float, float, float, float]] = {
    'red': (0.85, 0.10, 0.10, 1.0),
    'green': (0.10, 0.70, 0.15, 1.0),
    'blue': (0.10, 0.25, 0.90, 1.0),
    'yellow': (0.95, 0.85, 0.10, 1.0),
}

PICK_TEMPLATE = 'pick up the {colour} {shape}'
PLACE_TEMPLATE = 'put the {colour} {shape} on the {plate} plate'
PUSH_TEMPLATE = 'push the {colour} {shape} to the {side} zone'

_TEMPLATE_WORDS = ('pick', 'up', 'the', 'put', 'on', 'plate', 'push', 'to', 'zone')

# Every word any instruction can contain (lower case, split on spaces), in a fixed order.
VOCABULARY: tuple[str, ...] = _TEMPLATE_WORDS + COLOURS + SHAPES + ZONE_SIDES


def object_name(colour: str, shape: str) -> str:
    """Name of the sim body for an object, e.g. ``'red_cube'``."""
    return f'{colour}_{shape}'


def pick_instruction(colour: str, shape: str) -> str:
    return PICK_TEMPLATE.format(colour=colour, shape=shape)


def place_instruction(colour: str, shape: str, plate: str) -> str:
    return PLACE_TEMPLATE.format(colour=colour, shape=shape, plate=plate)


def push_instruction(colour: str, shape: str, side: str) -> str:
    return PUSH_TEMPLATE.format(colour=colour, shape=shape, side=side)
