from captionflow.dataflow import VideoToCaptionGenerator
from captionflow.dataflow import LocalModelVLMServing_vllm
from captionflow.dataflow import FileStorage

class VideoCaptionGenerator():
    def __init__(self):
        # -------- Storage Configuration --------
        self.storage = FileStorage(
            first_entry_file_name="./dataflow/example/video_caption/sample_data.json",
            cache_path="./cache",
            file_name_prefix="video_caption",
            cache_type="json",
        )
        self.model_cache_dir = './dataflow_cache'

        # -------- VLM Model Service --------
        self.vlm_serving = LocalModelVLMServing_vllm(
            hf_model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct",
            hf_cache_dir=self.model_cache_dir,
            vllm_tensor_parallel_size=1,
            vllm_temperature=0.7,
            vllm_top_p=0.9, 
            vllm_max_tokens=2048,
            vllm_max_model_len=51200,  
            vllm_gpu_memory_utilization=0.9
        )

        # -------- Video Caption Generator Operator --------
        self.video_to_caption_generator = VideoToCaptionGenerator(
            vlm_serving = self.vlm_serving,
        )

    def forward(self):
        self.video_to_caption_generator.run(
            storage = self.storage.step(),
            input_image_key="image",
            input_video_key="video",
            input_conversation_key="conversation",
            output_key="caption",
        )

if __name__ == "__main__":
    # Pipeline entry point
    model = VideoCaptionGenerator()
    model.forward()
