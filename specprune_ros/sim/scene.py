"""The MuJoCo tabletop scene, built as an MJCF string (no asset files).

World frame = robot base frame: origin at the centre of the table top, +x away from the robot, +y to the
robot's left, +z up. The table top is the plane z = 0.

Contents:
  * a floating parallel gripper: body ``hand`` (free joint, gravity compensated) welded softly to the
    mocap body ``hand_mocap``; two fingers on slide joints ``finger_left`` / ``finger_right`` driven by
    position actuators; site ``tcp`` is the grasp centre between the fingertips;
  * a pool of objects, one per (colour, shape): free bodies named ``'{colour}_{shape}'``; objects not used
    by an episode are parked (floating, collisions off) below the table;
  * a pool of plates, one per colour (mocap bodies ``plate_{colour}``, parked below the table when unused);
  * two flat zones ``zone_left`` / ``zone_right`` painted on the table (visual only);
  * cameras ``agentview`` (fixed, behind and above the robot base) and ``wrist`` (on the hand, looking
    down between the fingers).
"""
from __future__ import annotations

from specprune_ros.sim.vocab import COLOUR_RGBA, COLOURS, SHAPES, ZONE_SIDES, object_name

# --- geometry (metres) ------------------------------------------------------------------------------
TABLE_HALF = (0.40, 0.40)            # table top half extents (x, y)
OBJECT_HALF = 0.02                   # cube half side; cylinder radius and half height
PLATE_RADIUS = 0.055
PLATE_HALF_HEIGHT = 0.004
PLATE_TOP = 2 * PLATE_HALF_HEIGHT    # plates sit on the table; their top surface is at this height
ZONE_HALF = (0.07, 0.06)             # zone half extents (x, y)
ZONE_CENTRES: dict[str, tuple[float, float]] = {'left': (0.04, 0.19), 'right': (0.04, -0.19)}
PARK_Z = -0.5                        # unused objects / plates wait here, under the table

FINGER_MAX = 0.04                    # travel of each finger: gap between the fingers is 0..0.08 m
FINGER_HALF = (0.015, 0.006, 0.035)  # finger box half extents (x, y, z) in the hand frame
FINGER_Z = -0.045                    # finger centre below the hand origin
TCP_OFFSET_Z = -0.065                # tcp below the hand origin (fingertips end 1.5 cm below the tcp)
HAND_START = (0.08, 0.0, 0.25 - TCP_OFFSET_Z)

TIMESTEP = 0.002                     # physics step; 50 substeps per 0.1 s control step


def _rgba(values) -> str:
    return ' '.join(f'{v:.3f}' for v in values)


def _objects_xml() -> str:
    parts = []
    k = 0
    for colour in COLOURS:
        for shape in SHAPES:
            name = object_name(colour, shape)
            if shape == 'cube':
                geom = f'type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}"'
            else:
                geom = f'type="cylinder" size="{OBJECT_HALF} {OBJECT_HALF}"'
            parts.append(
                f'<body name="{name}" pos="{0.1 * k:.2f} 0 {PARK_Z}">'
                f'<freejoint name="{name}_joint"/>'
                f'<geom name="{name}" {geom} mass="0.05" rgba="{_rgba(COLOUR_RGBA[colour])}" '
                f'class="object"/></body>')
            k += 1
    return '\n'.join(parts)


def _plates_xml() -> str:
    parts = []
    for k, colour in enumerate(COLOURS):
        rgba = COLOUR_RGBA[colour]
        pale = tuple(0.55 * c + 0.45 for c in rgba[:3]) + (1.0,)
        parts.append(
            f'<body name="plate_{colour}" mocap="true" pos="{0.15 * k:.2f} 0.3 {PARK_Z}">'
            f'<geom name="plate_{colour}" type="cylinder" size="{PLATE_RADIUS} {PLATE_HALF_HEIGHT}" '
            f'rgba="{_rgba(pale)}" friction="1 0.005 0.0001"/>'
            f'<geom type="cylinder" size="{PLATE_RADIUS * 0.55} 0.0005" pos="0 0 {PLATE_HALF_HEIGHT}" '
            f'rgba="{_rgba(rgba)}" contype="0" conaffinity="0"/></body>')
    return '\n'.join(parts)


def _zones_xml() -> str:
    rgba = {'left': (0.80, 0.70, 0.90, 1.0), 'right': (0.95, 0.75, 0.55, 1.0)}
    parts = []
    for side in ZONE_SIDES:
        cx, cy = ZONE_CENTRES[side]
        parts.append(
            f'<body name="zone_{side}" mocap="true" pos="{cx} {cy} 0">'
            f'<geom name="zone_{side}" type="box" size="{ZONE_HALF[0]} {ZONE_HALF[1]} 0.0005" '
            f'pos="0 0 0.0005" rgba="{_rgba(rgba[side])}" contype="0" conaffinity="0"/></body>')
    return '\n'.join(parts)


def build_mjcf(offscreen_size: int = 640) -> str:
    """The whole scene as an MJCF string (the offscreen buffer must be at least the render size)."""
    hx, hy, hz = HAND_START
    fx, fy, fz = FINGER_HALF
    off = max(640, int(offscreen_size))
    return f"""
<mujoco model="specprune_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="10"/>
  <visual>
    <global offwidth="{off}" offheight="{off}"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.45 0.45 0.45" specular="0.05 0.05 0.05"/>
    <quality shadowsize="0" offsamples="0"/>
    <map znear="0.01"/>
  </visual>
  <default>
    <default class="object">
      <geom condim="6" friction="1.0 0.01 0.002" solref="0.01 1" priority="1"/>
    </default>
    <default class="finger">
      <geom condim="4" friction="1.5 0.02 0.0002" solref="0.01 1" rgba="0.25 0.25 0.28 1" priority="2"/>
    </default>
  </default>
  <worldbody>
    <light name="key" directional="true" pos="0.3 0.4 1.5" dir="-0.2 -0.3 -1" diffuse="0.55 0.55 0.55"
           castshadow="false"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" rgba="0.30 0.32 0.36 1"
          contype="0" conaffinity="0"/>
    <geom name="table" type="box" size="{TABLE_HALF[0]} {TABLE_HALF[1]} 0.02" pos="0 0 -0.02"
          rgba="0.62 0.50 0.38 1" friction="0.5 0.005 0.0001"/>
    <camera name="agentview" pos="-0.34 0 0.56" xyaxes="0 -1 0 0.56 0 0.38" fovy="40"/>
    <body name="hand_mocap" mocap="true" pos="{hx} {hy} {hz}"/>
    <body name="hand" pos="{hx} {hy} {hz}" gravcomp="1">
      <freejoint name="hand_joint"/>
      <geom name="palm" type="box" size="0.02 0.055 0.01" mass="0.3" rgba="0.55 0.55 0.6 1"/>
      <geom name="wrist_link" type="cylinder" size="0.015 0.03" pos="0 0 0.04" mass="0.05"
            rgba="0.55 0.55 0.6 1" contype="0" conaffinity="0"/>
      <site name="tcp" pos="0 0 {TCP_OFFSET_Z}" size="0.004" rgba="1 0 1 0"/>
      <camera name="wrist" pos="0.04 0 -0.012" xyaxes="0 -1 0 0.97 0 -0.25" fovy="75"/>
      <body name="finger_left" pos="0 {fy} {FINGER_Z}" gravcomp="1">
        <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_MAX}" damping="3"
               armature="0.01"/>
        <geom name="finger_left" type="box" size="{fx} {fy} {fz}" mass="0.03" class="finger"/>
      </body>
      <body name="finger_right" pos="0 {-fy} {FINGER_Z}" gravcomp="1">
        <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_MAX}" damping="3"
               armature="0.01"/>
        <geom name="finger_right" type="box" size="{fx} {fy} {fz}" mass="0.03" class="finger"/>
      </body>
    </body>
    {_objects_xml()}
    {_plates_xml()}
    {_zones_xml()}
  </worldbody>
  <contact>
    <exclude body1="hand" body2="finger_left"/>
    <exclude body1="hand" body2="finger_right"/>
    <exclude body1="finger_left" body2="finger_right"/>
  </contact>
  <equality>
    <weld name="hand_weld" body1="hand_mocap" body2="hand" relpose="0 0 0 1 0 0 0" solref="0.01 1"/>
  </equality>
  <actuator>
    <position name="finger_left" joint="finger_left" kp="300" ctrlrange="0 {FINGER_MAX}"
              forcerange="-12 12"/>
    <position name="finger_right" joint="finger_right" kp="300" ctrlrange="0 {FINGER_MAX}"
              forcerange="-12 12"/>
  </actuator>
</mujoco>
"""
