# Stands in for DataFlow-MM's 930-line OpenAI client (it needs the openai package): the
# operator only asks whether its serving is an instance of this class, and the local vLLM
# serving never is, so the answer is the same.
class APIVLMServing_openai:
    pass
