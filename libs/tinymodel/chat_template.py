"""The tiny model's chat template (Llama-3 style headers, string message content).

The template never loops over ``message['content']``, so vLLM's content-format
detection classifies it as a "string" template and flattens OpenAI content-part
lists to plain text before rendering (our ``infermesh.libs.tokenization`` does the
same).
"""

CHAT_TEMPLATE = r"""{#- infermesh tiny-llama: Llama-3 headers, string message content. -#}
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
    {{- 'Environment: ipython\n' }}
    {{- 'You can call the functions listed below. To call one, answer with only a JSON '
        + 'object of the form {"name": function name, "parameters": {argument name: value}}.'
        + '\n\n' }}
    {%- for tool in tools %}
        {%- if tool['function'] is defined %}
            {%- set fn = tool['function'] %}
        {%- else %}
            {%- set fn = tool %}
        {%- endif %}
        {{- 'Function: ' + fn['name'] | string + '\n' }}
        {%- if fn['description'] is defined and fn['description'] is not none %}
            {{- 'Description: ' + fn['description'] | string + '\n' }}
        {%- endif %}
        {%- if fn['parameters'] is defined and fn['parameters'] is not none %}
            {{- 'Parameters: ' + fn['parameters'] | tojson + '\n' }}
        {%- endif %}
        {{- '\n' }}
    {%- endfor %}
    {%- if system_message is string %}
        {{- system_message | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- elif system_message is not none %}
    {{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
    {%- if system_message is string %}
        {{- system_message | trim }}
    {%- else %}
        {{- system_message | tojson }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- set role = message['role'] %}
    {%- if role == 'tool' or role == 'ipython' %}
        {%- set header = 'ipython' %}
    {%- elif role == 'developer' %}
        {%- set header = 'system' %}
    {%- elif role in ['system', 'user', 'assistant'] %}
        {%- set header = role %}
    {%- else %}
        {{- raise_exception('Unsupported message role: ' + role | string
                            + '. Use system, user, assistant or tool.') }}
    {%- endif %}
    {{- '<|start_header_id|>' + header + '<|end_header_id|>\n\n' }}
    {%- set content = message['content'] %}
    {%- if content is string %}
        {{- content | trim }}
    {%- elif content is mapping or (content is iterable and content is not string) %}
        {{- content | tojson }}
    {%- endif %}
    {%- if role == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}
        {%- for tool_call in message['tool_calls'] %}
            {%- if tool_call['function'] is defined %}
                {%- set call = tool_call['function'] %}
            {%- else %}
                {%- set call = tool_call %}
            {%- endif %}
            {%- if content is string and content | trim or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {{- '{"name": ' + call['name'] | tojson + ', "parameters": ' }}
            {%- if call['arguments'] is string %}
                {{- call['arguments'] }}
            {%- else %}
                {{- call['arguments'] | tojson }}
            {%- endif %}
            {{- '}' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
