from captionflow.cli import main

main()
