from capsfuse_lite.cli import main

main()
