from nsn_cli.cli.app import main

main()
