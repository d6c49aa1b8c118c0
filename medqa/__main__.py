from medqa.cli import main

main()
