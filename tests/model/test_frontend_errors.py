"""Every way a model block can be wrong ends in a FrontendError that says what to fix."""

from __future__ import annotations

import pytest

from planc.compiler.model import FrontendError, load_model
from frontend_sources import EXAMPLES, factory_source, gpt_source, inputs, minilm_source

FACTORIES = '''
import torch


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 4)

    def forward(self, input_ids, segment):
        return self.emb(input_ids)


def broken(depth=1):
    raise ValueError(f"depth {depth} is too deep")


def not_a_module():
    return {"weights": 1}


def needs_segment():
    return Tagger()


class TinyVocab(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 4)

    def forward(self, input_ids):
        return self.emb(input_ids)


def tiny_vocab():
    return TinyVocab()


NOT_CALLABLE = 42
'''


@pytest.fixture()
def factories(tmp_path):
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "syntax_error.py").write_text("def gpt(:\n")
    return tmp_path


def _message(source) -> str:
    with pytest.raises(FrontendError) as caught:
        load_model(source)
    return str(caught.value)


def test_missing_hf_directory():
    message = _message(minilm_source(ref="no_such_model", package=None))
    assert "Hugging Face model directory 'no_such_model' not found" in message
    assert str(EXAMPLES / "no_such_model") in message


def test_hf_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    message = _message(minilm_source(ref="empty", package=None, base_dir=tmp_path))
    assert "no Hugging Face config.json" in message


def test_package_not_installed():
    assert "Python package 'no_such_package_xyz' is not installed" in _message(minilm_source(package="no_such_package_xyz"))


def test_missing_factory_file():
    message = _message(gpt_source(ref="models/gtp.py:gpt"))
    assert "factory file 'models/gtp.py' not found" in message


def test_factory_ref_without_function():
    assert "must look like 'path/to/file.py:function'" in _message(gpt_source(ref="models/gpt.py"))


def test_unknown_factory_function_suggests_the_closest(factories):
    message = _message(factory_source(factories, "factories.py:brokn"))
    assert "has no function 'brokn'" in message and "did you mean 'broken'?" in message


def test_factory_not_callable(factories):
    assert "is a int, not a callable factory" in _message(factory_source(factories, "factories.py:NOT_CALLABLE"))


def test_factory_that_raises_is_named_with_its_exception(factories):
    message = _message(factory_source(factories, "factories.py:broken", args={"depth": 7}))
    assert message == "factory 'factories.py:broken' raised ValueError: depth 7 is too deep"


def test_factory_with_unknown_argument(factories):
    message = _message(factory_source(factories, "factories.py:broken", args={"width": 7}))
    assert "raised TypeError" in message and "width" in message


def test_factory_returning_something_else(factories):
    assert "returned a dict, not a torch.nn.Module" in _message(factory_source(factories, "factories.py:not_a_module"))


def test_factory_file_that_does_not_import(factories):
    message = _message(factory_source(factories, "syntax_error.py:gpt"))
    assert "importing factory file 'syntax_error.py' raised SyntaxError" in message


def test_unimportable_factory_module():
    assert "cannot import factory module 'no_such_pkg.models'" in _message(gpt_source(ref="no_such_pkg.models:gpt"))


def test_declared_input_the_forward_does_not_accept():
    message = _message(gpt_source(inputs=inputs("input_ids", "attention_mask", "token_type_ids")))
    assert "GPT.forward does not accept an input named 'token_type_ids'" in message
    assert "input_ids, attention_mask, position_ids, past_key_values" in message


def test_misspelled_input_gets_a_suggestion():
    message = _message(minilm_source(inputs=inputs("input_ids", "attention_mask", "token_typ_ids")))
    assert "does not accept an input named 'token_typ_ids'" in message
    assert "did you mean 'token_type_ids'?" in message


def test_required_forward_argument_not_declared(factories):
    message = _message(factory_source(factories, "factories.py:needs_segment"))
    assert "Tagger.forward requires 'segment', which the plan does not declare" in message


def test_input_that_text_cannot_produce():
    message = _message(minilm_source(inputs=inputs("input_ids", "inputs_embeds")))
    assert "input 'inputs_embeds' cannot be produced from text" in message


def test_inputs_with_different_dims():
    specs = inputs("input_ids") + inputs("attention_mask", dims=("batch", "other"))
    assert "need the same dims" in _message(gpt_source(inputs=specs))


def test_input_with_wrong_rank():
    assert "must have two dims [batch, seq], got 1" in _message(gpt_source(inputs=inputs("input_ids", dims=("seq",))))


def test_byte_tokenizer_needs_256_ids(factories):
    message = _message(factory_source(factories, "factories.py:tiny_vocab"))
    assert "factory models are fed UTF-8 bytes (ids 0..255), but 'm' embeds only 100 token ids" in message
