"""Ground-truth scene data: composites that keep their parts (background, object, mask)."""

from diffgeo.data.scenes import (
    Scene,
    SceneConfig,
    bundled_scenes,
    generate_scenes,
    load_scenes,
    make_scene,
    save_scenes,
    scenes_to_tensor,
)

__all__ = ["Scene", "SceneConfig", "bundled_scenes", "generate_scenes", "load_scenes",
           "make_scene", "save_scenes", "scenes_to_tensor"]
