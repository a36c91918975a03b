"""ament_python packaging for specprune_ros (also pip-installable for the ROS-free core)."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'specprune_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    package_data={PACKAGE: ['assets/reference_vla/*']},
    include_package_data=True,
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    extras_require={'test': ['pytest']},
    zip_safe=False,
    maintainer='specprune_ros maintainers',
    maintainer_email='maintainers@specprune-ros.dev',
    description='Visual-token pruning for VLA robot policies, as a ROS 2 node.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'specprune_node = specprune_ros.ros.policy_node:main',
            'specprune_synthetic_camera = specprune_ros.ros.tools.synthetic_camera:main',
            'specprune_sim_bridge = specprune_ros.ros.sim_bridge_node:main',
            'specprune_bag_player = specprune_ros.ros.bag_player:main',
            'specprune_bag_recorder = specprune_ros.ros.bag_recorder:main',
            'specprune_evaluate_bag = specprune_ros.bags.cli:evaluate_main',
            'specprune_record_sim_bag = specprune_ros.bags.cli:record_sim_main',
        ],
    },
)
