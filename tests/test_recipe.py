import pytest

from compresscli.core.errors import RecipeError, StageError
from compresscli.engine.recipe import bundled_recipes, load_recipe, parse_recipe

GOOD = """description: test
stages:
  - method: magnitude
    targets: [mlp]
    params: {sparsity: 0.5}
  - method: finetune
    params: {steps: 3}
"""


@pytest.mark.parametrize("name", bundled_recipes())
def test_bundled_recipes_parse_and_describe_themselves(name):
    recipe = load_recipe(name)
    assert recipe.description and "\n" not in recipe.description.strip()
    assert recipe.stages


def test_defaults_are_filled_in():
    recipe = parse_recipe(GOOD)
    assert recipe.stages[0].config.scope == "global"
    assert recipe.stages[1].config.lr == pytest.approx(1e-4)
    assert "scope: global" in recipe.to_yaml()


@pytest.mark.parametrize("text, needle", [
    ("stages:\n  - method: magnitude\n    params: {sparsity: 1.0}\n", "r.yaml:3: stage 0 (magnitude): sparsity must be in [0, 1)"),
    ("stages:\n  - method: magnitude\n    params: {sparsity: -0.1}\n", "sparsity must be in [0, 1)"),
    ("stages:\n  - method: magnitude\n    params:\n      sparsty: 0.5\n", "r.yaml:4: stage 0 (magnitude): unknown parameter 'sparsty'; did you mean 'sparsity'?"),
    ("stages:\n  - method: magnitud\n", "unknown method 'magnitud'; did you mean 'magnitude'?"),
    ("stages:\n  - method: magnitude\n    target: [mlp]\n", "r.yaml:3: stage 0: unknown key 'target'; did you mean 'targets'?"),
    ("stages:\n  - method: finetune\n    params: {steps: ten}\n", "steps must be an integer"),
    ("stages:\n  - method: magnitude\n    params: {scope: globl}\n", "did you mean 'global'?"),
    ("stagez: []\n", "unknown key 'stagez'; did you mean 'stages'?"),
    ("stages: []\n", "no stages"),
    ("stages: [\n", "not valid YAML"),
])
def test_invalid_recipes_name_file_line_stage_and_key(text, needle):
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, "r.yaml")
    assert needle in str(err.value)


def test_overrides_for_sweeps():
    recipe = parse_recipe(GOOD, overrides=["0.sparsity=0.9", "1.steps=7", "0.targets=[attention]"])
    assert recipe.stages[0].config.sparsity == 0.9
    assert recipe.stages[1].config.steps == 7
    assert recipe.stages[0].targets == ["attention"]
    with pytest.raises(RecipeError, match="STAGE.KEY=VALUE"):
        parse_recipe(GOOD, overrides=["sparsity=0.9"])
    with pytest.raises(RecipeError, match="stages 0..1"):
        parse_recipe(GOOD, overrides=["5.sparsity=0.9"])
    with pytest.raises(RecipeError, match="sparsity must be in"):
        parse_recipe(GOOD, overrides=["0.sparsity=1.5"])


def test_unknown_recipe_name_suggests():
    with pytest.raises(RecipeError, match="did you mean 'magnitude-50'"):
        load_recipe("magnitude-5")
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe("missing/recipe.yaml")


@pytest.mark.parametrize("raised, expected", [(StageError("sparsity 0.99 leaves no weight"), RecipeError),
                                              (ValueError("an index bug"), ValueError)])
def test_only_a_stage_error_is_reported_as_a_recipe_mistake(tiny_hf_dirs, monkeypatch, raised, expected):
    """A method's configuration problem names the recipe and stage; any other exception is a bug and
    surfaces as itself, never as "change the stage's params"."""
    from compresscli.io.checkpoint import load_checkpoint
    from compresscli.methods import METHODS
    from compresscli.engine.options import RunOptions
    from compresscli.engine.whole_model import run_recipe

    def handler(model, selected, config, ctx):
        raise raised

    monkeypatch.setattr(METHODS.get("magnitude"), "handler", handler)
    recipe = parse_recipe("stages:\n  - method: magnitude\n    targets: [mlp]\n")
    with pytest.raises(expected) as caught:
        run_recipe(load_checkpoint(tiny_hf_dirs["bert"]), recipe, None, RunOptions(dry_run=True, evaluate=False))
    if expected is RecipeError:
        assert "stage 0 (magnitude): sparsity 0.99 leaves no weight" in str(caught.value)
        assert "change the stage's targets or params" in str(caught.value)
